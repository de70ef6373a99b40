"""The lazy mount's read path without FUSE: chunk ranges, single fetches, amplification, digests, cache, prefetch."""

from __future__ import annotations

import concurrent.futures
import errno
import io
import random
import tarfile
import threading
import time
from pathlib import Path

import pytest

from services.chunk_fuse.cache import ChunkCache
from services.chunk_fuse.mount_config import PrefetchConfig
from services.chunk_fuse.prefetch import Prefetcher, TokenBucket, batch_chunks, plan_chunks
from services.chunk_fuse.reader import AccessTrace, ChunkReader, LatencyHistogram, ReadError
from shared.image_format import (
    BlobInfo,
    Bootstrap,
    ChunkInfo,
    ConversionOptions,
    LocalBlobSource,
    convert_layers,
)

CHUNK = 4096


def _file_bytes(seed: int, size: int) -> bytes:
    rng = random.Random(seed)
    # Half random, half repetitive: chunks that compress and chunks that do not.
    return bytes(rng.getrandbits(8) for _ in range(size // 2)) + bytes([seed % 251]) * (size - size // 2)


FILES = {
    "big.bin": _file_bytes(1, 10 * CHUNK + 123),
    "small/a.txt": b"alpha\n" * 10,
    "small/b.txt": b"bravo\n" * 20,
    "small/c.txt": b"charlie\n" * 30,
    "mid.bin": _file_bytes(2, 3 * CHUNK),
}


class CountingFetcher:
    """A RangeFetcher over local blobs that counts requests and can be slowed down or corrupt data."""

    def __init__(self, source: LocalBlobSource, delay: float = 0.0) -> None:
        self.source = source
        self.delay = delay
        self.requests: list[tuple[str, int, int]] = []
        self.corrupt_at: set[int] = set()
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(4)

    def fetch(self, blob: BlobInfo, offset: int, length: int) -> concurrent.futures.Future[bytes]:
        with self._lock:
            self.requests.append((blob.sha256, offset, length))

        def work() -> bytes:
            time.sleep(self.delay)
            data = bytearray(self.source.read_range(blob, offset, length))
            for position in self.corrupt_at:
                if offset <= position < offset + length:
                    data[position - offset] ^= 0x01
            return bytes(data)

        return self._pool.submit(work)

    @property
    def bytes(self) -> int:
        return sum(length for _, _, length in self.requests)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Bootstrap, Path]:
    work = tmp_path_factory.mktemp("image")
    layer = work / "layer.tar"
    with tarfile.open(layer, "w") as tar:
        for name, data in FILES.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    result = convert_layers([layer], work / "out", ConversionOptions(chunk_size=CHUNK, prefetch_files=["/mid.bin"]))
    return Bootstrap.load(result.bootstrap_path), work / "out" / "blobs" / "sha256"


def make_reader(
    image: tuple[Bootstrap, Path], cache_dir: Path | None, *, delay: float = 0.0, **options: int | bool
) -> tuple[ChunkReader, CountingFetcher]:
    bootstrap, blobs = image
    fetcher = CountingFetcher(LocalBlobSource(blobs), delay)
    cache = ChunkCache(cache_dir) if cache_dir is not None else None
    return ChunkReader(bootstrap, fetcher, cache, **options), fetcher  # type: ignore[arg-type]


def ino(bootstrap: Bootstrap, path: str) -> int:
    return bootstrap.lookup(path).ino


def test_reads_at_any_offset_return_the_file_bytes(image: tuple[Bootstrap, Path], tmp_path: Path) -> None:
    reader, _ = make_reader(image, tmp_path)
    bootstrap = image[0]
    rng = random.Random(7)
    for name, data in FILES.items():
        node = ino(bootstrap, "/" + name)
        assert reader.read(node, 0, len(data) + 100) == data
        for _ in range(20):
            offset = rng.randrange(0, len(data) + 10)
            size = rng.randrange(0, 3 * CHUNK)
            assert reader.read(node, offset, size) == data[offset : offset + size]


def test_a_read_fetches_only_its_chunks_in_one_merged_request(image: tuple[Bootstrap, Path]) -> None:
    reader, fetcher = make_reader(image, None, amplify_io=0)
    bootstrap = image[0]
    node = ino(bootstrap, "/big.bin")
    reader.read(node, CHUNK + 10, 2 * CHUNK)  # touches chunks 1, 2 and 3
    refs = bootstrap.chunks_for_range(node, CHUNK + 10, 2 * CHUNK)
    assert len(refs) == 3
    assert len(fetcher.requests) == 1, "adjacent chunks must be one Range request"
    assert fetcher.bytes == sum(r.chunk.compressed_size for r in refs)
    assert reader.stats.chunks_fetched == 3


def test_merging_size_caps_one_request(image: tuple[Bootstrap, Path]) -> None:
    reader, fetcher = make_reader(image, None, amplify_io=0, merging_size=4096)
    node = ino(image[0], "/big.bin")
    reader.read(node, 0, 10 * CHUNK)
    assert all(length <= 4096 or length == max(r[2] for r in fetcher.requests) for _, _, length in fetcher.requests)
    assert len(fetcher.requests) > 1


def test_small_reads_are_amplified_to_the_following_chunks(image: tuple[Bootstrap, Path]) -> None:
    bootstrap = image[0]
    reader, fetcher = make_reader(image, None, amplify_io=64 << 10)
    reader.read(ino(bootstrap, "/small/a.txt"), 0, 10)
    [(_, _, length)] = fetcher.requests
    # One request brought the neighbours (the other small files, the next chunks of the blob) too.
    assert length > bootstrap.chunks_for_range(ino(bootstrap, "/small/a.txt"), 0, 10)[0].chunk.compressed_size
    before = len(fetcher.requests)
    assert reader.read(ino(bootstrap, "/small/b.txt"), 0, 1 << 20) == FILES["small/b.txt"]
    assert len(fetcher.requests) == before, "the neighbour was fetched already"


def test_concurrent_reads_of_one_chunk_cause_one_fetch(image: tuple[Bootstrap, Path]) -> None:
    reader, fetcher = make_reader(image, None, delay=0.2, amplify_io=0)
    node = ino(image[0], "/mid.bin")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: reader.read(node, 100, 50), range(8)))
    assert results == [FILES["mid.bin"][100:150]] * 8
    assert len(fetcher.requests) == 1
    assert reader.stats.chunks_waited == 7


def test_a_corrupted_chunk_fails_the_read_with_eio_and_is_not_cached(
    image: tuple[Bootstrap, Path], tmp_path: Path
) -> None:
    bootstrap = image[0]
    node = ino(bootstrap, "/big.bin")
    chunk = bootstrap.chunks_for_range(node, 0, 1)[0].chunk
    reader, fetcher = make_reader(image, tmp_path, amplify_io=0, digest_validate=True)
    fetcher.corrupt_at.add(chunk.compressed_offset + chunk.compressed_size // 2)
    with pytest.raises(ReadError) as caught:
        reader.read(node, 0, 100)
    assert caught.value.errno == errno.EIO
    assert reader.stats.digest_failures == 1
    assert not ChunkCache(tmp_path).contains(chunk)
    # The next read fetches again (and succeeds once the bytes are right).
    fetcher.corrupt_at.clear()
    assert reader.read(node, 0, 100) == FILES["big.bin"][:100]


def test_chunks_survive_in_the_disk_cache_for_the_next_reader(image: tuple[Bootstrap, Path], tmp_path: Path) -> None:
    bootstrap = image[0]
    node = ino(bootstrap, "/big.bin")
    first, fetcher = make_reader(image, tmp_path)
    assert first.read(node, 0, 1 << 20) == FILES["big.bin"]
    assert fetcher.requests
    second, fetcher2 = make_reader(image, tmp_path)
    assert second.read(node, 0, 1 << 20) == FILES["big.bin"]
    assert fetcher2.requests == []
    # Repeated chunks of the file are one chunk: read from disk once, then from memory.
    assert second.stats.chunks_from_disk == len({r.chunk.index for r in bootstrap.file_chunks(node)})


def test_a_damaged_cached_chunk_is_fetched_again(image: tuple[Bootstrap, Path], tmp_path: Path) -> None:
    bootstrap = image[0]
    node = ino(bootstrap, "/mid.bin")
    first, _ = make_reader(image, tmp_path, amplify_io=0)
    first.read(node, 0, 10)
    chunk = bootstrap.chunks_for_range(node, 0, 1)[0].chunk
    path = ChunkCache(tmp_path).path(chunk)
    path.write_bytes(b"x" * chunk.uncompressed_size)
    second, fetcher = make_reader(image, tmp_path, amplify_io=0)
    assert second.read(node, 0, 10) == FILES["mid.bin"][:10]
    assert len(fetcher.requests) == 1


def test_the_cache_evicts_least_recently_used_chunks_over_its_limit(
    image: tuple[Bootstrap, Path], tmp_path: Path
) -> None:
    bootstrap, blobs = image
    cache = ChunkCache(tmp_path, size_limit=6 * CHUNK)
    reader = ChunkReader(bootstrap, CountingFetcher(LocalBlobSource(blobs)), cache, amplify_io=0)
    node = ino(bootstrap, "/big.bin")
    for index in range(10):
        reader.read(node, index * CHUNK, 1)
        time.sleep(0.01)  # distinct mtimes: the LRU order
    assert cache.total_bytes() <= 6 * CHUNK
    assert cache.evicted_chunks > 0
    refs = bootstrap.file_chunks(node)
    assert cache.contains(refs[9].chunk), "the most recent chunk stays"
    assert not cache.contains(refs[0].chunk), "the oldest goes first"


def test_the_access_trace_records_first_reads_in_order_within_its_window(image: tuple[Bootstrap, Path]) -> None:
    bootstrap = image[0]
    reader, _ = make_reader(image, None, amplify_io=0)
    reader.trace = AccessTrace(seconds=0.3, max_chunks=100)
    mid, big = ino(bootstrap, "/mid.bin"), ino(bootstrap, "/big.bin")
    reader.read(mid, 0, 10)
    reader.read(big, 5 * CHUNK, 10)
    reader.read(mid, 0, 10)
    time.sleep(0.35)
    reader.read(big, 0, 10)
    expected = [
        bootstrap.chunks_for_range(mid, 0, 1)[0].chunk.index,
        bootstrap.chunks_for_range(big, 5 * CHUNK, 1)[0].chunk.index,
    ]
    assert reader.trace.chunks == expected
    assert reader.trace.complete


def test_prefetch_plan_is_learned_list_then_table_then_everything(image: tuple[Bootstrap, Path]) -> None:
    bootstrap = image[0]
    mid_chunks = [r.chunk.index for r in bootstrap.file_chunks(ino(bootstrap, "/mid.bin"))]
    plan = plan_chunks(bootstrap, learned=[5, 2, 5], table=True, everything=True)
    indices = [c.index for c in plan]
    assert indices[:2] == [5, 2]
    assert indices[2 : 2 + len([i for i in mid_chunks if i not in (5, 2)])] == [
        i for i in mid_chunks if i not in (5, 2)
    ]
    assert sorted(indices) == list(range(bootstrap.chunk_count))
    batches = batch_chunks(plan, merging_size=3 * CHUNK)
    assert sum(len(b) for b in batches) == len(plan)
    assert all(sum(c.compressed_size for c in b) <= 3 * CHUNK or len(b) == 1 for b in batches)


def test_prefetch_fetches_exactly_the_learned_list(image: tuple[Bootstrap, Path], tmp_path: Path) -> None:
    bootstrap = image[0]
    reader, fetcher = make_reader(image, tmp_path)
    learned = [3, 0, 7]
    prefetcher = Prefetcher(reader, PrefetchConfig(enable=False), learned=learned)
    prefetcher.start()
    assert prefetcher.wait(10)
    assert prefetcher.progress.state == "done"
    assert prefetcher.progress.done_chunks == 3
    cache = ChunkCache(tmp_path)
    cached = [i for i in range(bootstrap.chunk_count) if cache.contains(bootstrap.chunk(i))]
    assert cached == sorted(learned)
    assert reader.stats.prefetch_chunks_fetched == 3
    assert fetcher.bytes == sum(bootstrap.chunk(i).compressed_size for i in learned)


def test_prefetch_keeps_to_its_bandwidth(image: tuple[Bootstrap, Path], tmp_path: Path) -> None:
    bootstrap = image[0]
    reader, _ = make_reader(image, tmp_path)
    total = sum(bootstrap.chunk(i).compressed_size for i in range(bootstrap.chunk_count))
    rate = total  # bytes per second: the whole image should take about one second past the burst
    config = PrefetchConfig(enable=True, prefetch_all=True, threads_count=4, merging_size=4096, bandwidth_rate=rate)
    prefetcher = Prefetcher(reader, config)
    started = time.monotonic()
    prefetcher.start()
    assert prefetcher.wait(20)
    elapsed = time.monotonic() - started
    burst = max(rate, 4096)
    assert elapsed >= (total - burst) / rate * 0.8
    assert prefetcher.progress.done_chunks == bootstrap.chunk_count


def test_token_bucket_debt_makes_callers_wait() -> None:
    bucket = TokenBucket(rate=1000, burst=1000)
    assert bucket.reserve(1000) == 0.0
    assert bucket.reserve(500) == pytest.approx(0.5, abs=0.05)
    assert TokenBucket(rate=0, burst=1).reserve(10**9) == 0.0


def test_latency_histogram_is_cumulative() -> None:
    histogram = LatencyHistogram((0.001, 0.01))
    for seconds in (0.0005, 0.005, 0.005, 1.0):
        histogram.observe(seconds)
    snapshot = histogram.snapshot()
    assert snapshot["buckets"] == [[0.001, 1], [0.01, 3], ["+Inf", 4]]
    assert snapshot["count"] == 4


class GatedCache(ChunkCache):
    """A chunk cache whose writes wait for a gate: a slow disk, held still."""

    def __init__(self, work_dir: Path, gate: threading.Event) -> None:
        super().__init__(work_dir)
        self.gate = gate

    def write(self, chunk: ChunkInfo, data: bytes) -> None:
        assert self.gate.wait(10), "the gate never opened"
        super().write(chunk, data)


def test_with_write_behind_a_read_waits_for_the_network_not_the_disk(
    image: tuple[Bootstrap, Path], tmp_path: Path
) -> None:
    bootstrap, blobs = image
    gate = threading.Event()
    cache = GatedCache(tmp_path, gate)
    fetcher = CountingFetcher(LocalBlobSource(blobs))
    # No memory LRU: a chunk not yet on disk can only come from the writer's queue.
    reader = ChunkReader(bootstrap, fetcher, cache, amplify_io=0, memory_bytes=0, write_behind=True)
    node = ino(bootstrap, "/big.bin")
    chunks = [ref.chunk for ref in bootstrap.chunks_for_range(node, 0, 2 * CHUNK)]
    assert reader.read(node, 0, 2 * CHUNK) == FILES["big.bin"][: 2 * CHUNK]  # The writer is held at the gate.
    assert not any(cache.contains(chunk) for chunk in chunks)
    fetched = len(fetcher.requests)
    assert reader.read(node, 100, CHUNK) == FILES["big.bin"][100 : 100 + CHUNK]
    assert len(fetcher.requests) == fetched, "a queued chunk is served from the queue, not fetched again"
    assert all(reader.is_available(chunk) for chunk in chunks)

    threading.Timer(0.2, gate.set).start()
    reader.drop_memory()  # Drains the queue first: afterwards every chunk read so far is on disk.
    assert all(cache.contains(chunk) for chunk in chunks)

    reader.close()
    later = bootstrap.chunks_for_range(node, 5 * CHUNK, 10)[0].chunk
    reader.read(node, 5 * CHUNK, 10)
    assert cache.contains(later), "after close a fetch writes the cache itself"


def test_a_chunk_queued_as_the_writer_shuts_down_is_still_written(
    image: tuple[Bootstrap, Path], tmp_path: Path
) -> None:
    bootstrap, blobs = image
    cache = ChunkCache(tmp_path)
    reader = ChunkReader(bootstrap, CountingFetcher(LocalBlobSource(blobs)), cache, amplify_io=0, write_behind=True)
    node = ino(bootstrap, "/mid.bin")
    reader.read(node, 0, 10)  # Starts the writer.
    assert reader._writer is not None
    reader._writer.shutdown(wait=True)  # As close() would, between a fetch's queueing and its submit.
    reader.read(node, CHUNK, 10)
    assert cache.contains(bootstrap.chunks_for_range(node, CHUNK, 10)[0].chunk)
    assert not reader._unwritten
