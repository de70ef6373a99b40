"""Reading file contents back: group chunks into ranged blob reads, decompress and verify them.

A lazy-loading daemon fetches ``ChunkRun`` byte ranges (one HTTP Range request each) from a registry or a
peer, then calls :func:`decode_run`; everything here is transport-agnostic.  :class:`LocalBlobSource` reads
blob files from disk, for tests, ``check`` and a local cache.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .bootstrap import BlobInfo, Bootstrap, ChunkInfo, Inode
from .compression import Compressor, decompress
from .errors import CorruptChunkError, DigestMismatchError, InvalidOptionError, NotFoundError

#: Default cap on one coalesced read, so a huge file is not fetched as a single response.
DEFAULT_MAX_RUN_BYTES = 16 << 20


class BlobSource(Protocol):
    """Anything that can return a byte range of a blob (local file, HTTP Range request, peer)."""

    def read_range(self, blob: BlobInfo, offset: int, length: int) -> bytes:
        """Return exactly ``length`` bytes of ``blob`` starting at ``offset``."""
        ...


class LocalBlobSource:
    """Blob source backed by files: a directory of blobs named by their sha256 hex, or a mapping."""

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        files: Mapping[str, str | os.PathLike[str]] | None = None,
    ) -> None:
        self._dir = Path(directory) if directory is not None else None
        self._files = {k.removeprefix("sha256:"): Path(v) for k, v in (files or {}).items()}
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _fd(self, sha256: str) -> int:
        with self._lock:
            fd = self._fds.get(sha256)
            if fd is None:
                path = self._files.get(sha256)
                if path is None and self._dir is not None:
                    path = self._dir / sha256
                if path is None or not path.is_file():
                    raise NotFoundError(f"blob sha256:{sha256} is not available locally")
                fd = self._fds[sha256] = os.open(path, os.O_RDONLY)
            return fd

    def read_range(self, blob: BlobInfo, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` with pread (safe from several threads)."""
        data = os.pread(self._fd(blob.sha256), length, offset)
        if len(data) != length:
            raise CorruptChunkError(f"blob {blob.digest} is shorter than the bootstrap says")
        return data

    def close(self) -> None:
        """Close cached file descriptors."""
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> LocalBlobSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class ChunkRun:
    """Chunks stored back to back (or with small gaps) in one blob: fetchable with one range read."""

    blob_index: int
    blob_sha256: str
    offset: int
    length: int
    chunks: tuple[ChunkInfo, ...]

    @property
    def end(self) -> int:
        """Blob offset just past the run."""
        return self.offset + self.length

    @property
    def range_header(self) -> str:
        """HTTP ``Range`` header value for this run."""
        return f"bytes={self.offset}-{self.end - 1}"


def coalesce_chunks(
    chunks: Iterable[ChunkInfo], *, max_gap: int = 0, max_run_bytes: int = DEFAULT_MAX_RUN_BYTES
) -> list[ChunkRun]:
    """Group unique chunks into runs, each one contiguous range of one blob.

    Chunks are de-duplicated and sorted by (blob, offset).  Two neighbours join when the gap between
    them is at most ``max_gap`` bytes (fetching a small gap beats a second request) and the run stays
    within ``max_run_bytes`` (a single chunk larger than that still forms its own run).
    """
    if max_gap < 0 or max_run_bytes <= 0:
        raise InvalidOptionError("max_gap must be >= 0 and max_run_bytes > 0")
    unique = {c.index: c for c in chunks}
    ordered = sorted(unique.values(), key=lambda c: (c.blob_index, c.compressed_offset))
    runs: list[ChunkRun] = []
    current: list[ChunkInfo] = []
    for c in ordered:
        if current:
            head, tail = current[0], current[-1]
            if (
                c.blob_index == head.blob_index
                and 0 <= c.compressed_offset - tail.compressed_end <= max_gap
                and c.compressed_end - head.compressed_offset <= max_run_bytes
            ):
                current.append(c)
                continue
            runs.append(_run(current))
        current = [c]
    if current:
        runs.append(_run(current))
    return runs


def _run(chunks: list[ChunkInfo]) -> ChunkRun:
    head, tail = chunks[0], chunks[-1]
    return ChunkRun(
        head.blob_index,
        head.blob_sha256,
        head.compressed_offset,
        tail.compressed_end - head.compressed_offset,
        tuple(chunks),
    )


def decode_chunk(chunk: ChunkInfo, data: bytes | memoryview) -> bytes:
    """Decompress one chunk's stored bytes and verify its digest (raises DigestMismatchError)."""
    if len(data) != chunk.compressed_size:
        raise CorruptChunkError(f"chunk {chunk.index}: got {len(data)} bytes, expected {chunk.compressed_size}")
    algorithm = chunk.compressor if chunk.compressed else Compressor.NONE
    raw = decompress(algorithm, data, chunk.uncompressed_size)
    actual = chunk.digester.digest(raw)
    if actual != chunk.digest:
        raise DigestMismatchError(chunk.index, chunk.digest_str, chunk.digester.format_digest(actual))
    return raw


def decode_run(run: ChunkRun, data: bytes | memoryview) -> dict[int, bytes]:
    """Decode every chunk of a fetched run; returns chunk index -> uncompressed bytes."""
    if len(data) != run.length:
        raise CorruptChunkError(f"run at {run.offset}: got {len(data)} bytes, expected {run.length}")
    view = memoryview(data)
    out = {}
    for c in run.chunks:
        start = c.compressed_offset - run.offset
        out[c.index] = decode_chunk(c, view[start : start + c.compressed_size])
    return out


def fetch_chunks(
    bootstrap: Bootstrap, source: BlobSource, chunks: Iterable[ChunkInfo], *, max_gap: int = 0
) -> dict[int, bytes]:
    """Fetch and decode chunks with as few range reads as possible."""
    out: dict[int, bytes] = {}
    for run in coalesce_chunks(chunks, max_gap=max_gap):
        data = source.read_range(bootstrap.blobs[run.blob_index], run.offset, run.length)
        out.update(decode_run(run, data))
    return out


def read_file_range(bootstrap: Bootstrap, source: BlobSource, inode: int | Inode, offset: int, size: int) -> bytes:
    """Bytes ``[offset, offset+size)`` of a regular file (short at end of file), verified."""
    refs = bootstrap.chunks_for_range(inode, offset, size)
    if not refs:
        return b""
    data = fetch_chunks(bootstrap, source, (r.chunk for r in refs))
    end = min(offset + size, refs[-1].file_end)
    parts = []
    for ref in refs:
        chunk = data[ref.chunk.index]
        lo = max(offset - ref.file_offset, 0)
        hi = min(end - ref.file_offset, len(chunk))
        parts.append(chunk if lo == 0 and hi == len(chunk) else chunk[lo:hi])
    return b"".join(parts)


def read_file(bootstrap: Bootstrap, source: BlobSource, inode: int | Inode) -> bytes:
    """Whole content of a regular file, verified."""
    attr = bootstrap.getattr(inode)
    return read_file_range(bootstrap, source, attr.ino, 0, attr.size)
