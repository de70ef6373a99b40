"""File reads of a lazy mount: which chunks, from memory, disk or network, each fetched once.

A read of ``[offset, offset+size)`` needs chunks ``offset // chunk_size ..= (end-1) // chunk_size``.  Each
comes from, in order: a small in-memory LRU of recently decoded chunks, the disk cache (one ``pread`` of
just the bytes asked for), or the network.  Missing chunks are claimed in a table of in-flight fetches
under one lock, so concurrent reads of the same chunk cause one fetch and the others wait for it.  The
claimed chunks are then amplified: a small read grows to the blob's following chunks (the next files of the
same layer, usually read next) until the run reaches ``amplify_io`` bytes; runs of adjacent chunks are
merged into one HTTP Range request of at most ``merging_size`` bytes.  Every fetched chunk is decompressed,
checked against its digest when ``digest_validate`` is on, and written to the disk cache.  A chunk that
fails its check fails the read with EIO (the kernel gets ``-EIO``) and is not cached.

With ``write_behind`` (the mount daemon's setting) the disk cache is written by one writer thread after the
read that fetched a chunk has its bytes: until then the chunk is served from the writer's queue, and
:meth:`ChunkReader.flush` (or ``close``) waits for the queue to drain.  A cold start then waits for the
network only, not for the disk.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import errno
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from services.chunk_fuse.cache import ChunkCache
from shared.image_format import BlobInfo, BlobSource, Bootstrap, ChunkInfo, ImageFormatError, coalesce_chunks
from shared.image_format.compression import Compressor, decompress
from shared.image_format.reader import decode_chunk

logger = logging.getLogger(__name__)

#: Chunks waiting for the write-behind thread hold at most this many bytes; past it a fetch writes itself.
WRITE_BEHIND_BYTES = 64 << 20

#: Read latency buckets (seconds): cached reads take tens of microseconds, cold ones a round trip or more.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class RangeFetcher(Protocol):
    """Starts the fetch of a byte range of a blob; the future gives exactly ``length`` bytes."""

    def fetch(self, blob: BlobInfo, offset: int, length: int) -> concurrent.futures.Future[bytes]:
        """Begin fetching ``[offset, offset+length)`` of ``blob``."""
        ...


class SourceFetcher:
    """A RangeFetcher over a synchronous BlobSource (local files in tests and tools)."""

    def __init__(self, source: BlobSource) -> None:
        self.source = source

    def fetch(self, blob: BlobInfo, offset: int, length: int) -> concurrent.futures.Future[bytes]:
        """Read at once; the future is already done."""
        future: concurrent.futures.Future[bytes] = concurrent.futures.Future()
        try:
            future.set_result(self.source.read_range(blob, offset, length))
        except Exception as exc:
            future.set_exception(exc)
        return future


class ReadError(OSError):
    """A read the filesystem must fail (EIO), with the reason for the log."""

    def __init__(self, message: str, err: int = errno.EIO) -> None:
        super().__init__(err, message)


class LatencyHistogram:
    """A fixed-bucket histogram, cheap to observe from many threads and to export to Prometheus."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(buckets)
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        """Count one observation."""
        slot = bisect.bisect_left(self.bounds, seconds)
        with self._lock:
            self._counts[slot] += 1
            self._sum += seconds

    def snapshot(self) -> dict[str, object]:
        """Cumulative bucket counts (``le`` bounds, the last one ``+Inf``), the sum and the count."""
        with self._lock:
            counts = list(self._counts)
            total = self._sum
        cumulative, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            running += count
            cumulative.append(["+Inf" if bound == float("inf") else bound, running])
        return {"buckets": cumulative, "sum": total, "count": running}


@dataclass
class ReadStats:
    """What the reads of one mount did."""

    reads: int = 0
    read_bytes: int = 0
    read_errors: int = 0
    chunks_fetched: int = 0
    chunk_bytes_fetched: int = 0
    chunks_from_memory: int = 0
    chunks_from_disk: int = 0
    chunks_waited: int = 0
    digest_failures: int = 0
    prefetch_chunks_fetched: int = 0
    prefetch_bytes_fetched: int = 0
    fetch_requests: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        """Add to several counters at once."""
        with self._lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)

    def snapshot(self) -> dict[str, object]:
        """The counters and the latency histogram as a dict."""
        with self._lock:
            out: dict[str, object] = {
                key: getattr(self, key)
                for key in (
                    "reads",
                    "read_bytes",
                    "read_errors",
                    "chunks_fetched",
                    "chunk_bytes_fetched",
                    "chunks_from_memory",
                    "chunks_from_disk",
                    "chunks_waited",
                    "digest_failures",
                    "prefetch_chunks_fetched",
                    "prefetch_bytes_fetched",
                    "fetch_requests",
                )
            }
        out["read_latency_seconds"] = self.latency.snapshot()
        return out


class AccessTrace:
    """The chunks a cold start reads in its first seconds, in first-read order (learned prefetch)."""

    def __init__(self, seconds: float, max_chunks: int) -> None:
        self.deadline = time.monotonic() + seconds
        self.max_chunks = max_chunks
        self.chunks: list[int] = []
        self._seen: set[int] = set()
        self._lock = threading.Lock()

    @property
    def complete(self) -> bool:
        """True once the recording window has closed."""
        return time.monotonic() >= self.deadline or len(self.chunks) >= self.max_chunks

    def record(self, indices: Iterable[int]) -> None:
        """Note chunks read now (only their first read counts)."""
        if self.complete:
            return
        with self._lock:
            for index in indices:
                if index not in self._seen and len(self.chunks) < self.max_chunks:
                    self._seen.add(index)
                    self.chunks.append(index)


class ChunkReader:
    """Reads file ranges of one bootstrap through the memory LRU, the disk cache and a RangeFetcher."""

    def __init__(
        self,
        bootstrap: Bootstrap,
        fetcher: RangeFetcher,
        cache: ChunkCache | None,
        *,
        digest_validate: bool = True,
        amplify_io: int = 128 << 10,
        merging_size: int = 1 << 20,
        memory_bytes: int = 64 << 20,
        fetch_timeout: float = 120.0,
        stats: ReadStats | None = None,
        write_behind: bool = False,
    ) -> None:
        self.bootstrap = bootstrap
        self.fetcher = fetcher
        self.cache = cache
        self.digest_validate = digest_validate
        self.amplify_io = amplify_io
        self.merging_size = merging_size
        self.memory_bytes = memory_bytes
        self.fetch_timeout = fetch_timeout
        self.stats = stats or ReadStats()
        self.trace: AccessTrace | None = None
        self._lock = threading.Lock()
        self._inflight: dict[int, concurrent.futures.Future[bytes]] = {}
        self._memory: OrderedDict[int, bytes] = OrderedDict()
        self._memory_used = 0
        self._verified: set[int] = set()
        self._ondemand_active = 0
        self.write_behind = write_behind
        # Verified chunks fetched but not yet in the disk cache (write-behind), and their writer.
        self._unwritten: dict[int, bytes] = {}
        self._unwritten_bytes = 0
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False

    # -- public API ---------------------------------------------------------------------------------

    def drop_memory(self) -> int:
        """Forget the decoded chunks held in memory (as ``drop_caches`` does the page cache); how many.

        Chunks still waiting to be written are written first, so afterwards every read is from disk."""
        self.flush()
        with self._lock:
            count = len(self._memory)
            self._memory.clear()
            self._memory_used = 0
        return count

    def flush(self) -> None:
        """Wait until every chunk fetched so far is in the disk cache (write-behind)."""
        with self._lock:
            writer = self._writer
        if writer is not None:
            # One writer thread takes the queue in order: once this no-op has run, all before it have.
            with contextlib.suppress(RuntimeError):  # Shut down meanwhile: close() drained it.
                writer.submit(lambda: None).result()

    def close(self) -> None:
        """Write what is still queued and stop the writer; later fetches write to the cache themselves."""
        with self._lock:
            self._closed = True
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=True)

    @property
    def ondemand_active(self) -> int:
        """On-demand fetches going on now (the prefetcher stays out of their way)."""
        return self._ondemand_active

    def read(self, ino: int, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset+size)`` of a regular file (short at its end); ReadError on failure."""
        started = time.perf_counter()
        try:
            data = self._read(ino, offset, size)
        except ReadError:
            self.stats.add(reads=1, read_errors=1)
            raise
        finally:
            self.stats.latency.observe(time.perf_counter() - started)
        self.stats.add(reads=1, read_bytes=len(data))
        return data

    def is_available(self, chunk: ChunkInfo) -> bool:
        """Whether a chunk is in memory or on disk (no fetch needed)."""
        if chunk.index in self._memory or chunk.index in self._unwritten:
            return True
        return self.cache is not None and self.cache.contains(chunk)

    def fetch_chunks(self, chunks: Sequence[ChunkInfo], *, prefetch: bool = False) -> None:
        """Make sure these chunks are local (prefetch and warm-up); ReadError if one cannot be had."""
        missing = [c for c in chunks if not self.is_available(c)]
        if missing:
            self._fetch(missing, amplify=False, prefetch=prefetch)

    # -- reading ------------------------------------------------------------------------------------

    def _read(self, ino: int, offset: int, size: int) -> bytes:
        try:
            refs = self.bootstrap.chunks_for_range(ino, offset, size)
        except ImageFormatError as exc:
            raise ReadError(str(exc), exc.errno) from exc
        if not refs:
            return b""
        if self.trace is not None:
            self.trace.record(ref.chunk.index for ref in refs)
        end = min(offset + size, refs[-1].file_end)
        parts: list[bytes | None] = []
        spans: list[tuple[int, int]] = []
        missing: list[ChunkInfo] = []
        for ref in refs:
            lo = max(offset - ref.file_offset, 0)
            hi = min(end - ref.file_offset, ref.chunk.uncompressed_size)
            spans.append((lo, hi))
            local = self._local(ref.chunk, lo, hi)
            parts.append(local)
            if local is None:
                missing.append(ref.chunk)
        if missing:
            fetched = self._fetch(missing, amplify=True, prefetch=False)
            for i, ref in enumerate(refs):
                if parts[i] is None:
                    lo, hi = spans[i]
                    whole = fetched[ref.chunk.index]
                    parts[i] = whole if lo == 0 and hi == len(whole) else whole[lo:hi]
        return b"".join(p for p in parts if p is not None)

    def _local(self, chunk: ChunkInfo, lo: int, hi: int) -> bytes | None:
        with self._lock:
            data = self._memory.get(chunk.index)
            if data is not None:
                self._memory.move_to_end(chunk.index)
            else:
                data = self._unwritten.get(chunk.index)
        if data is not None:
            self.stats.add(chunks_from_memory=1)
            return data if lo == 0 and hi == len(data) else data[lo:hi]
        if self.cache is None:
            return None
        if self.digest_validate and chunk.index not in self._verified:
            # The first use of a cached chunk in this process checks it whole: the disk is not trusted
            # more than the network when the config asks for digests.
            whole = self.cache.read(chunk)
            if whole is None:
                return None
            if chunk.digester.digest(whole) != chunk.digest:
                logger.warning("cached chunk %d fails its digest; fetching it again", chunk.index)
                self.cache.path(chunk).unlink(missing_ok=True)
                return None
            self._verified.add(chunk.index)
            self._remember(chunk.index, whole)
            self.stats.add(chunks_from_disk=1)
            return whole if lo == 0 and hi == len(whole) else whole[lo:hi]
        part = self.cache.read(chunk, lo, hi)
        if part is not None:
            self.stats.add(chunks_from_disk=1)
        return part

    def _remember(self, index: int, data: bytes) -> None:
        if self.memory_bytes <= 0:
            return
        with self._lock:
            if index in self._memory:
                return
            self._memory[index] = data
            self._memory_used += len(data)
            while self._memory_used > self.memory_bytes and self._memory:
                _, old = self._memory.popitem(last=False)
                self._memory_used -= len(old)

    # -- fetching -----------------------------------------------------------------------------------

    def _fetch(self, chunks: Sequence[ChunkInfo], *, amplify: bool, prefetch: bool) -> dict[int, bytes]:
        """Claim what nobody fetches yet, fetch it, and wait for the rest; chunk index -> bytes."""
        waits: dict[int, concurrent.futures.Future[bytes]] = {}
        mine: list[ChunkInfo] = []
        with self._lock:
            for chunk in chunks:
                if chunk.index in waits:
                    continue
                future = self._inflight.get(chunk.index)
                if future is None:
                    future = concurrent.futures.Future()
                    self._inflight[chunk.index] = future
                    mine.append(chunk)
                waits[chunk.index] = future
            extras = self._amplify(mine) if amplify and mine else []
            if not prefetch and mine:
                self._ondemand_active += 1
        if len(waits) > len(mine):
            self.stats.add(chunks_waited=len(waits) - len(mine))
        if mine:
            try:
                self._fetch_claimed(mine + extras, prefetch=prefetch)
            finally:
                if not prefetch:
                    with self._lock:
                        self._ondemand_active -= 1
        out: dict[int, bytes] = {}
        for index, future in waits.items():
            try:
                out[index] = future.result(timeout=self.fetch_timeout)
            except concurrent.futures.TimeoutError:
                raise ReadError(f"chunk {index}: no data after {self.fetch_timeout:.0f}s") from None
            except ReadError:
                raise
            except Exception as exc:
                raise ReadError(f"chunk {index}: {exc}") from exc
        return out

    def _amplify(self, claimed: list[ChunkInfo]) -> list[ChunkInfo]:
        """Following chunks of the blob that a small read also takes (called with the lock held)."""
        if self.amplify_io <= 0:
            return []
        extras: list[ChunkInfo] = []
        claimed_ids = {c.index for c in claimed}
        for run in coalesce_chunks(claimed, max_gap=0, max_run_bytes=self.merging_size):
            length = run.length
            last = run.chunks[-1]
            index = last.index + 1
            while length < self.amplify_io and index < self.bootstrap.chunk_count:
                nxt = self.bootstrap.chunk(index)
                if (
                    nxt.blob_index != last.blob_index
                    or nxt.compressed_offset != last.compressed_end
                    or length + nxt.compressed_size > max(self.amplify_io, self.merging_size)
                    or nxt.index in self._inflight
                    or nxt.index in claimed_ids
                    or nxt.index in self._memory
                    or (self.cache is not None and self.cache.contains(nxt))
                ):
                    break
                future: concurrent.futures.Future[bytes] = concurrent.futures.Future()
                self._inflight[nxt.index] = future
                extras.append(nxt)
                length += nxt.compressed_size
                last = nxt
                index += 1
        return extras

    def _fetch_claimed(self, claimed: list[ChunkInfo], *, prefetch: bool) -> None:
        """Fetch, decode, verify and store chunks this thread claimed; every claimed future ends resolved."""
        runs = coalesce_chunks(claimed, max_gap=0, max_run_bytes=self.merging_size)
        futures = [
            (run, self.fetcher.fetch(self.bootstrap.blobs[run.blob_index], run.offset, run.length)) for run in runs
        ]
        try:
            for run, future in futures:
                try:
                    data = future.result(timeout=self.fetch_timeout)
                    if len(data) != run.length:
                        raise ReadError(f"blob range {run.range_header}: got {len(data)} bytes, expected {run.length}")
                except Exception as exc:
                    logger.warning("fetching %s of blob %s failed: %s", run.range_header, run.blob_sha256[:12], exc)
                    self._fail(run.chunks, exc)
                    continue
                self.stats.add(fetch_requests=1)
                view = memoryview(data)
                for chunk in run.chunks:
                    start = chunk.compressed_offset - run.offset
                    try:
                        raw = self._decode(chunk, view[start : start + chunk.compressed_size])
                    except ImageFormatError as exc:
                        self.stats.add(digest_failures=1)
                        logger.error("chunk %d of blob %s is corrupt: %s", chunk.index, run.blob_sha256[:12], exc)
                        self._fail([chunk], exc)
                        continue
                    self._store(chunk, raw)
                    self._verified.add(chunk.index)
                    self._remember(chunk.index, raw)
                    if prefetch:
                        self.stats.add(prefetch_chunks_fetched=1, prefetch_bytes_fetched=chunk.compressed_size)
                    else:
                        self.stats.add(chunks_fetched=1, chunk_bytes_fetched=chunk.compressed_size)
                    self._resolve(chunk.index, raw, None)
        finally:
            # Nothing claimed may stay pending: waiters would hang until their timeout.
            leftover = [c for c in claimed if c.index in self._inflight and not self._inflight[c.index].done()]
            self._fail(leftover, RuntimeError("fetch abandoned"))

    def _store(self, chunk: ChunkInfo, raw: bytes) -> None:
        """Put a verified chunk in the disk cache, behind the read that fetched it when write-behind is on."""
        cache = self.cache
        if cache is None:
            return
        with self._lock:
            behind = (
                self.write_behind
                and not self._closed
                and chunk.index not in self._unwritten
                and self._unwritten_bytes + len(raw) <= WRITE_BEHIND_BYTES
            )
            if behind:
                self._unwritten[chunk.index] = raw
                self._unwritten_bytes += len(raw)
                if self._writer is None:
                    self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="chunk-writer")
                writer = self._writer
        if not behind:
            cache.write(chunk, raw)
            return
        try:
            writer.submit(self._write_queued, cache, chunk)
        except RuntimeError:  # close() shut the writer down in the meantime: write it here.
            self._write_queued(cache, chunk)

    def _write_queued(self, cache: ChunkCache, chunk: ChunkInfo) -> None:
        with self._lock:
            raw = self._unwritten.get(chunk.index)
        if raw is None:
            return
        try:
            cache.write(chunk, raw)  # Disk trouble is logged there; the chunk is then just not cached.
        except Exception:
            logger.exception("writing chunk %d to the cache failed", chunk.index)
        finally:
            with self._lock:
                if self._unwritten.pop(chunk.index, None) is not None:
                    self._unwritten_bytes -= len(raw)

    def _decode(self, chunk: ChunkInfo, data: memoryview) -> bytes:
        if self.digest_validate:
            return decode_chunk(chunk, data)
        algorithm = chunk.compressor if chunk.compressed else Compressor.NONE
        return decompress(algorithm, data, chunk.uncompressed_size)

    def _fail(self, chunks: Iterable[ChunkInfo], exc: BaseException) -> None:
        for chunk in chunks:
            self._resolve(chunk.index, None, exc)

    def _resolve(self, index: int, data: bytes | None, exc: BaseException | None) -> None:
        with self._lock:
            future = self._inflight.pop(index, None)
        if future is None or future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(data if data is not None else b"")
