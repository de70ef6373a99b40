"""Chunk store: digests, deduplicates and compresses file chunks, and appends them to blob files.

Chunks are cut at fixed file offsets (``i * chunk_size``), so a read's chunk range is pure arithmetic.  A
chunk whose digest was already stored - in this layer or an earlier one - is only referenced, never
stored again.  Each layer gets its own blob holding the new chunks of that layer, in first-seen order; a
blob therefore depends only on its layer and the layers below it, so a base layer shared by two images
converts to the same blob.

Digesting and compressing run in a thread pool (blake3, hashlib, zstd and lz4 release the GIL) while the
main thread keeps decompressing and parsing the tar stream.  Results are consumed strictly in submission
order, which keeps the blob layout deterministic however the threads are scheduled.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .compression import ChunkCompressor, Compressor
from .digest import Digester

#: Submit work to the pool in batches of about this many bytes: files are mostly small, and one
#: future per 4 KiB chunk would cost more in Python overhead than the hashing itself.
_BATCH_BYTES = 1 << 20
_BATCH_CHUNKS = 256
#: Blob writes and blob hashing are batched: each write/update drops and re-takes the GIL, and with the
#: pool busy a re-take can stall the tar-parsing thread for a whole switch interval.
_WRITE_BYTES = 4 << 20

FLAG_COMPRESSED = 1


@dataclass(slots=True)
class StoredChunk:
    """Where one unique chunk lives."""

    blob_index: int
    compressed_offset: int
    compressed_size: int
    uncompressed_size: int
    digest: bytes
    flags: int


@dataclass(slots=True)
class BlobRecord:
    """A finished blob file."""

    index: int
    path: Path
    sha256: str
    compressed_size: int
    uncompressed_size: int
    chunk_count: int
    compressor: Compressor


# (digest, stored bytes or None when already known, compressed?, uncompressed size)
_Result = tuple[bytes, bytes | None, bool, int]


class ChunkStore:
    """Accepts chunks in file order and returns sequence numbers resolved later to chunk indices."""

    def __init__(
        self,
        blob_dir: Path,
        *,
        compressor: Compressor,
        digester: Digester,
        level: int | None = None,
        workers: int = 2,
    ) -> None:
        self.blob_dir = blob_dir
        self.compressor = compressor
        self.digester = digester
        self._codec = ChunkCompressor(compressor, level)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chunk") if workers > 0 else None
        self._max_inflight = 2 * workers + 2
        self._inflight: deque[Future[list[_Result]]] = deque()
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        # Digest -> chunk index.  Read (never written) by worker threads to skip compressing known chunks.
        self._index: dict[bytes, int] = {}
        self.chunks: list[StoredChunk] = []
        self._seq_chunk: list[int] = []
        self.blobs: list[BlobRecord] = []
        self.total_chunks = 0
        self.total_bytes = 0
        self._blob_file: BinaryIO | None = None
        self._blob_tmp: Path | None = None
        self._blob_hash = hashlib.sha256()
        self._blob_size = 0
        self._blob_usize = 0
        self._blob_chunks = 0
        self._unwritten: list[bytes] = []
        self._unwritten_bytes = 0
        self._layer = 0

    # -- producer side -------------------------------------------------------------------------------

    def begin_layer(self, layer: int) -> None:
        """Start collecting the chunks of ``layer`` (its blob is created on the first new chunk)."""
        self._layer = layer

    def add(self, data: bytes) -> int:
        """Queue one chunk; returns its sequence number (see :meth:`resolve`)."""
        seq = self.total_chunks
        self.total_chunks += 1
        self.total_bytes += len(data)
        self._batch.append(data)
        self._batch_bytes += len(data)
        if self._batch_bytes >= _BATCH_BYTES or len(self._batch) >= _BATCH_CHUNKS:
            self._submit()
        return seq

    def end_layer(self) -> BlobRecord | None:
        """Finish the current layer's blob; None when the layer brought no new chunk."""
        self._submit()
        while self._inflight:
            self._collect()
        if self._blob_file is None:
            return None
        self._flush()
        self._blob_file.close()
        self._blob_file = None
        assert self._blob_tmp is not None
        sha = self._blob_hash.hexdigest()
        final = self.blob_dir / sha
        os.replace(self._blob_tmp, final)
        record = BlobRecord(
            index=len(self.blobs),
            path=final,
            sha256=sha,
            compressed_size=self._blob_size,
            uncompressed_size=self._blob_usize,
            chunk_count=self._blob_chunks,
            compressor=self.compressor,
        )
        self.blobs.append(record)
        return record

    def resolve(self, seq: int) -> int:
        """Chunk index of a sequence number returned by :meth:`add` (valid after :meth:`end_layer`)."""
        return self._seq_chunk[seq]

    def close(self) -> None:
        """Stop the worker threads and remove an unfinished blob file."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._blob_file is not None:
            self._blob_file.close()
            self._blob_file = None
            if self._blob_tmp is not None:
                self._blob_tmp.unlink(missing_ok=True)

    # -- pipeline ------------------------------------------------------------------------------------

    def _submit(self) -> None:
        if not self._batch:
            return
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        if self._pool is None:
            done: Future[list[_Result]] = Future()
            done.set_result(self._work(batch))
            self._inflight.append(done)
        else:
            self._inflight.append(self._pool.submit(self._work, batch))
        while len(self._inflight) > self._max_inflight:
            self._collect()

    def _work(self, batch: list[bytes]) -> list[_Result]:
        digest = self.digester.digest
        compress = self._codec.compress
        known = self._index
        out: list[_Result] = []
        for data in batch:
            d = digest(data)
            # A digest already in the index was stored by an earlier chunk (the index is only filled
            # in order), so compression can be skipped; a racing duplicate is merely compressed twice.
            if d in known:
                out.append((d, None, False, len(data)))
            else:
                stored, compressed = compress(data)
                out.append((d, stored, compressed, len(data)))
        return out

    def _collect(self) -> None:
        results = self._inflight.popleft().result()
        for d, stored, compressed, usize in results:
            idx = self._index.get(d)
            if idx is None:
                assert stored is not None, "a chunk skipped as known must have been stored before"
                idx = self._write(d, stored, compressed, usize)
            self._seq_chunk.append(idx)

    def _write(self, d: bytes, stored: bytes, compressed: bool, usize: int) -> int:
        if self._blob_file is None:
            self._blob_tmp = self.blob_dir / f".layer-{self._layer}.tmp"
            self._blob_file = open(self._blob_tmp, "wb")  # noqa: SIM115 - closed in end_layer/close
            self._blob_hash = hashlib.sha256()
            self._blob_size = self._blob_usize = self._blob_chunks = 0
        idx = len(self.chunks)
        self.chunks.append(
            StoredChunk(
                blob_index=len(self.blobs),
                compressed_offset=self._blob_size,
                compressed_size=len(stored),
                uncompressed_size=usize,
                digest=d,
                flags=FLAG_COMPRESSED if compressed else 0,
            )
        )
        self._index[d] = idx
        self._unwritten.append(stored)
        self._unwritten_bytes += len(stored)
        if self._unwritten_bytes >= _WRITE_BYTES:
            self._flush()
        self._blob_size += len(stored)
        self._blob_usize += usize
        self._blob_chunks += 1
        return idx

    def _flush(self) -> None:
        if not self._unwritten:
            return
        assert self._blob_file is not None
        data = b"".join(self._unwritten)
        self._unwritten, self._unwritten_bytes = [], 0
        self._blob_hash.update(data)
        self._blob_file.write(data)
