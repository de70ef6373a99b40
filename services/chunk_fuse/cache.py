"""The local chunk cache: verified, uncompressed chunks on disk, named by their digest.

Each chunk is one file, ``<work_dir>/chunks/<digester>/<hex[:2]>/<hex>``, written to a temporary name and
renamed, so a reader never sees half a chunk and a crash leaves at most a stray ``.tmp``.  Being named by
content, a chunk fetched for one image serves every image (and every mount, and the next agent) that has
it.  Chunks are stored uncompressed, so a cached read is one ``pread`` of just the bytes asked for.

Size limit: when the bytes written push the total past ``size_limit``, the directory is rescanned (the
truth, even with several daemons sharing it) and the least recently used chunks are deleted until the total
is under 90 % of the limit.  "Recently used" is the file's mtime, which a hit refreshes (at most once a
minute per chunk, to keep hits cheap).  A chunk deleted under a reader is just a miss.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path

from shared.image_format import ChunkInfo

logger = logging.getLogger(__name__)

#: How often a hit refreshes a chunk's mtime (its LRU position), in seconds.
TOUCH_INTERVAL = 60.0
#: After an eviction the cache holds at most this fraction of its limit, so evictions come in batches.
EVICT_TO = 0.9


class ChunkCache:
    """Chunks on disk, shared by every mount (and process) that uses the same directory."""

    def __init__(self, work_dir: Path, size_limit: int = 0) -> None:
        self.root = Path(work_dir) / "chunks"
        self.root.mkdir(parents=True, exist_ok=True)
        self.size_limit = size_limit
        self._lock = threading.Lock()
        self._touched: dict[str, float] = {}
        self._written_since_scan = 0
        self._approx_total = self._scan_total() if size_limit else 0
        self.evicted_chunks = 0
        self.evicted_bytes = 0

    def path(self, chunk: ChunkInfo) -> Path:
        """Where a chunk lives (whether or not it is there)."""
        hexdigest = chunk.digest.hex()
        return self.root / chunk.digester.value / hexdigest[:2] / hexdigest

    def contains(self, chunk: ChunkInfo) -> bool:
        """Whether the chunk is on disk."""
        return self.path(chunk).is_file()

    def read(self, chunk: ChunkInfo, start: int = 0, end: int | None = None) -> bytes | None:
        """Bytes ``[start, end)`` of the chunk, or None on a miss."""
        path = self.path(chunk)
        end = chunk.uncompressed_size if end is None else end
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            if os.fstat(fd).st_size != chunk.uncompressed_size:
                # Another writer's half-finished file cannot exist (rename), so this is damage: drop it.
                logger.warning("cached chunk %s has the wrong size; discarding it", path.name)
                with contextlib.suppress(OSError):
                    path.unlink()
                return None
            data = os.pread(fd, end - start, start)
        finally:
            os.close(fd)
        self._touch(path)
        return data

    def _touch(self, path: Path) -> None:
        now = time.monotonic()
        key = path.name
        if now - self._touched.get(key, -TOUCH_INTERVAL) < TOUCH_INTERVAL:
            return
        self._touched[key] = now
        with contextlib.suppress(OSError):
            os.utime(path)

    def write(self, chunk: ChunkInfo, data: bytes) -> None:
        """Store a verified chunk (a no-op when it is there already)."""
        path = self.path(chunk)
        if path.is_file():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as sink:
                sink.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            # A full or read-only disk must not fail the read that fetched the chunk.
            logger.warning("cannot cache chunk %s: %s", path.name, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        if self.size_limit:
            with self._lock:
                self._approx_total += len(data)
                over = self._approx_total > self.size_limit
            if over:
                self.evict()

    def _entries(self) -> list[tuple[float, int, Path]]:
        out = []
        for sub in self.root.glob("*/*/*"):
            if sub.name.startswith("."):
                continue
            with contextlib.suppress(FileNotFoundError):
                st = sub.stat()
                out.append((st.st_mtime, st.st_size, sub))
        return out

    def _scan_total(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def total_bytes(self) -> int:
        """Bytes of chunks on disk now (a directory scan)."""
        return self._scan_total()

    def evict(self) -> int:
        """Delete least recently used chunks until the cache is under its limit; returns bytes freed."""
        with self._lock:
            entries = sorted(self._entries())
            total = sum(size for _, size, _ in entries)
            target = int(self.size_limit * EVICT_TO)
            freed = 0
            for _mtime, size, path in entries:
                if total - freed <= target:
                    break
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    freed += size
                    self.evicted_chunks += 1
                    self._touched.pop(path.name, None)
            self.evicted_bytes += freed
            self._approx_total = total - freed
            if freed:
                logger.info("chunk cache over %d bytes: evicted %d bytes", self.size_limit, freed)
            return freed
