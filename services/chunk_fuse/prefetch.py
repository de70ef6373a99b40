"""Background prefetch: the learned list, then the prefetch table, then (optionally) everything else.

``threads_count`` worker threads take batches of chunks off one ordered plan, each batch a run of blob
neighbours of at most ``merging_size`` bytes (one Range request).  A token bucket keeps the workers within
``bandwidth_rate`` bytes per second.  On-demand reads never wait for prefetch: they do not pass through the
bucket, a worker starts no new request while an on-demand fetch is going on, and a chunk the reader needs
that a worker is already fetching is simply waited for (it is on its way at full speed).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from services.chunk_fuse.mount_config import PrefetchConfig
from services.chunk_fuse.reader import ChunkReader
from shared.image_format import Bootstrap, ChunkInfo

logger = logging.getLogger(__name__)

#: How long a worker waits between looks while on-demand reads are fetching.
YIELD_SLEEP = 0.005


class TokenBucket:
    """A byte-rate limiter shared by threads; a request larger than the burst goes into debt."""

    def __init__(self, rate: int, burst: int) -> None:
        self.rate = rate
        self.burst = max(burst, 1)
        self._tokens = float(self.burst)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def reserve(self, amount: int) -> float:
        """Take ``amount`` tokens; returns how long the caller must wait before using them."""
        if self.rate <= 0:
            return 0.0
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= amount
            return -self._tokens / self.rate if self._tokens < 0 else 0.0


@dataclass
class PrefetchProgress:
    """How far the prefetch plan has come."""

    state: str = "idle"
    planned_chunks: int = 0
    planned_bytes: int = 0
    done_chunks: int = 0
    done_bytes: int = 0
    learned_chunks: int = 0
    failed_batches: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def advance(self, chunks: int, nbytes: int) -> None:
        """Count a finished batch."""
        with self._lock:
            self.done_chunks += chunks
            self.done_bytes += nbytes

    def snapshot(self) -> dict[str, object]:
        """The progress as a dict (``seconds``: how long it ran, so far or in all)."""
        with self._lock:
            end = self.finished_at or time.monotonic()
            return {
                "state": self.state,
                "planned_chunks": self.planned_chunks,
                "planned_bytes": self.planned_bytes,
                "done_chunks": self.done_chunks,
                "done_bytes": self.done_bytes,
                "learned_chunks": self.learned_chunks,
                "failed_batches": self.failed_batches,
                "seconds": round(end - self.started_at, 3) if self.started_at else 0.0,
            }


def plan_chunks(
    bootstrap: Bootstrap, *, learned: Sequence[int] = (), table: bool = True, everything: bool = False
) -> list[ChunkInfo]:
    """The chunks to prefetch, in order and without repeats: learned list, prefetch table, the rest."""
    seen: set[int] = set()
    out: list[ChunkInfo] = []

    def take(indices: Iterable[int]) -> None:
        for index in indices:
            if 0 <= index < bootstrap.chunk_count and index not in seen:
                seen.add(index)
                out.append(bootstrap.chunk(index))

    take(learned)
    if table:
        for ino in bootstrap.prefetch_files():
            take(ref.chunk.index for ref in bootstrap.file_chunks(ino))
    if everything:
        take(range(bootstrap.chunk_count))
    return out


def batch_chunks(chunks: Sequence[ChunkInfo], merging_size: int) -> list[list[ChunkInfo]]:
    """Consecutive plan entries that are blob neighbours, grouped into runs of at most ``merging_size``."""
    batches: list[list[ChunkInfo]] = []
    current: list[ChunkInfo] = []
    length = 0
    for chunk in chunks:
        if current:
            tail = current[-1]
            if (
                chunk.blob_index == tail.blob_index
                and chunk.compressed_offset == tail.compressed_end
                and length + chunk.compressed_size <= merging_size
            ):
                current.append(chunk)
                length += chunk.compressed_size
                continue
            batches.append(current)
        current, length = [chunk], chunk.compressed_size
    if current:
        batches.append(current)
    return batches


class Prefetcher:
    """Worker threads that fetch a plan of chunks in the background."""

    def __init__(
        self,
        reader: ChunkReader,
        config: PrefetchConfig,
        *,
        learned: Sequence[int] = (),
    ) -> None:
        self.reader = reader
        self.config = config
        self.learned = list(learned)
        self.progress = PrefetchProgress()
        self.bucket = TokenBucket(config.bandwidth_rate, max(config.bandwidth_rate, config.merging_size))
        self._queue: queue.Queue[list[ChunkInfo] | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._remaining = 0
        self._remaining_lock = threading.Lock()

    def start(self) -> None:
        """Plan and start the workers (nothing happens when the plan is empty)."""
        bootstrap = self.reader.bootstrap
        plan = plan_chunks(
            bootstrap,
            learned=self.learned,
            table=self.config.enable,
            everything=self.config.enable and self.config.prefetch_all,
        )
        self.progress.learned_chunks = sum(1 for i in self.learned if 0 <= i < bootstrap.chunk_count)
        self.progress.planned_chunks = len(plan)
        self.progress.planned_bytes = sum(c.compressed_size for c in plan)
        if not plan:
            self.progress.state = "done"
            return
        batches = batch_chunks(plan, self.config.merging_size)
        self._remaining = len(batches)
        for batch in batches:
            self._queue.put(batch)
        workers = min(self.config.threads_count, len(batches))
        for _ in range(workers):
            self._queue.put(None)
        self.progress.state = "running"
        self.progress.started_at = time.monotonic()
        for i in range(workers):
            thread = threading.Thread(target=self._work, name=f"prefetch-{i}", daemon=True)
            self._threads.append(thread)
            thread.start()
        logger.info(
            "prefetching %d chunks (%d bytes, %d learned) with %d workers",
            len(plan),
            self.progress.planned_bytes,
            self.progress.learned_chunks,
            workers,
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the workers to stop and wait for them."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the plan is done; True if it is."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(deadline - time.monotonic(), 0))
        return all(not t.is_alive() for t in self._threads)

    def _work(self) -> None:
        while not self._stop.is_set():
            batch = self._queue.get()
            if batch is None:
                return
            try:
                self._one(batch)
            except Exception as exc:
                with self.progress._lock:
                    self.progress.failed_batches += 1
                logger.warning("prefetch of %d chunks failed: %s", len(batch), exc)
            finally:
                with self._remaining_lock:
                    self._remaining -= 1
                    if self._remaining == 0:
                        self.progress.state = "done"
                        self.progress.finished_at = time.monotonic()

    def _one(self, batch: list[ChunkInfo]) -> None:
        missing = [c for c in batch if not self.reader.is_available(c)]
        if missing:
            # On-demand reads first: start nothing new while one is fetching.
            while self.reader.ondemand_active and not self._stop.is_set():
                time.sleep(YIELD_SLEEP)
            wait = self.bucket.reserve(sum(c.compressed_size for c in missing))
            if wait > 0 and self._stop.wait(wait):
                return
            self.reader.fetch_chunks(missing, prefetch=True)
        self.progress.advance(len(batch), sum(c.compressed_size for c in batch))
