"""Conversion of OCI layer tar streams into a bootstrap plus content-addressed data blobs.

Output layout inside ``work_dir`` (nothing is written anywhere else, and nothing from the layers is ever
unpacked to disk)::

    work_dir/bootstrap                 the merged tree (see docs/format.md)
    work_dir/blobs/sha256/<hex>        one data blob per layer that brought new chunks
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from .bootstrap import write_bootstrap
from .chunker import ChunkStore
from .compression import Compressor
from .digest import Digester
from .errors import InvalidOptionError, LayerError
from .tar_merge import LayerDelta, MergedTree, classify
from .tar_reader import DEFAULT_MAX_HEADER_SIZE, EntryKind, LayerCompression, LayerInput, LayerReader

DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 4 << 10
MAX_CHUNK_SIZE = 16 << 20
BOOTSTRAP_NAME = "bootstrap"
BLOB_SUBDIR = ("blobs", "sha256")


@dataclass(frozen=True)
class ConversionOptions:
    """Knobs of :func:`convert_layers`; the defaults are the format's defaults."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    compressor: Compressor | str = Compressor.ZSTD
    digester: Digester | str = Digester.BLAKE3
    prefetch_files: Sequence[str] = ()
    #: zstd level (1..22); None means the fixed default, 3.  Ignored by lz4 and none.
    compression_level: int | None = None
    #: Digest/compress threads; None picks one per CPU (2 here), 0 does everything on the calling thread.
    workers: int | None = None
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE

    def validate(self) -> tuple[Compressor, Digester]:
        """Check ranges; returns the parsed compressor and digester."""
        cs = self.chunk_size
        if not (MIN_CHUNK_SIZE <= cs <= MAX_CHUNK_SIZE) or cs & (cs - 1):
            raise InvalidOptionError(
                f"chunk size must be a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}, got {cs}"
            )
        if self.workers is not None and self.workers < 0:
            raise InvalidOptionError("workers must be >= 0")
        if self.max_header_size < 512:
            raise InvalidOptionError("max_header_size must be at least 512")
        if isinstance(self.prefetch_files, str):
            raise InvalidOptionError("prefetch_files must be a sequence of paths, not one string")
        return Compressor.parse(self.compressor), Digester.parse(self.digester)


class BlobFile(NamedTuple):
    """A data blob written by the converter."""

    path: Path
    sha256: str
    size: int

    @property
    def digest(self) -> str:
        """OCI digest string (``sha256:<hex>``)."""
        return "sha256:" + self.sha256


@dataclass
class LayerStats:
    """What one source layer contained and produced."""

    index: int
    compression: LayerCompression
    compressed_size: int
    compressed_digest: str
    diff_id: str
    tar_size: int
    entries: int = 0
    files: int = 0
    file_bytes: int = 0
    chunks: int = 0
    new_chunks: int = 0
    blob: BlobFile | None = None


@dataclass
class ConversionStats:
    """Figures about a conversion (not stored in the bootstrap, so timing does not affect it)."""

    layers: list[LayerStats] = field(default_factory=list)
    entries: int = 0
    inodes: int = 0
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    devices: int = 0
    fifos: int = 0
    file_bytes: int = 0
    chunks: int = 0
    chunk_bytes: int = 0
    unique_chunks: int = 0
    unique_bytes: int = 0
    compressed_bytes: int = 0
    bootstrap_size: int = 0
    source_compressed_bytes: int = 0
    tar_bytes: int = 0
    elapsed_seconds: float = 0.0
    prefetch_missing: list[str] = field(default_factory=list)

    @property
    def dedup_ratio(self) -> float:
        """Chunked bytes / unique chunk bytes (1.0 = no duplicate content)."""
        return self.chunk_bytes / self.unique_bytes if self.unique_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        """Blob bytes / unique uncompressed bytes."""
        return self.compressed_bytes / self.unique_bytes if self.unique_bytes else 1.0

    @property
    def throughput_mb_s(self) -> float:
        """Uncompressed tar megabytes (10**6) converted per second."""
        return self.tar_bytes / self.elapsed_seconds / 1e6 if self.elapsed_seconds else 0.0


@dataclass
class ConversionResult:
    """Paths and digests of everything :func:`convert_layers` wrote."""

    bootstrap_path: Path
    bootstrap_sha256: str
    bootstrap_size: int
    blobs: list[BlobFile]
    stats: ConversionStats

    @property
    def blob_dir(self) -> Path:
        """Directory holding the blobs by sha256 hex (what ``LocalBlobSource`` takes)."""
        return self.bootstrap_path.parent.joinpath(*BLOB_SUBDIR)

    @property
    def bootstrap_digest(self) -> str:
        """OCI digest string of the bootstrap."""
        return "sha256:" + self.bootstrap_sha256


def convert_layers(
    layers: Iterable[LayerInput],
    work_dir: str | os.PathLike[str],
    options: ConversionOptions | None = None,
) -> ConversionResult:
    """Convert layer tars (lowest first; paths, bytes or binary streams) into a bootstrap and blobs."""
    opts = options or ConversionOptions()
    compressor, digester = opts.validate()
    workers = opts.workers if opts.workers is not None else (os.cpu_count() or 1)
    started = time.perf_counter()
    out_dir = Path(work_dir)
    blob_dir = out_dir.joinpath(*BLOB_SUBDIR)
    blob_dir.mkdir(parents=True, exist_ok=True)

    stats = ConversionStats()
    tree = MergedTree()
    store = ChunkStore(
        blob_dir, compressor=compressor, digester=digester, level=opts.compression_level, workers=workers
    )
    cs = opts.chunk_size
    try:
        for index, layer in enumerate(layers):
            store.begin_layer(index)
            first_chunk, first_unique = store.total_chunks, len(store.chunks)
            delta = LayerDelta()
            with LayerReader(layer, index, max_header_size=opts.max_header_size) as reader:
                entries = files = file_bytes = 0
                for entry in reader.entries():
                    entries += 1
                    try:
                        kind = classify(entry)
                    except LayerError as exc:
                        exc.layer, exc.entry = index, entry.name
                        raise
                    if kind == "marker":
                        delta.add_marker(entry)
                    elif kind == "entry":
                        if entry.kind is EntryKind.REG:
                            files += 1
                            file_bytes += entry.size
                            delta.add_entry(entry, [store.add(c) for c in reader.read_chunks(entry, cs)])
                        else:
                            delta.add_entry(entry)
                digests = reader.finish()
            record = store.end_layer()
            # Sequence numbers become chunk-table indices once the layer's pipeline has drained.
            for rec in delta.records:
                if isinstance(rec, tuple) and rec[1]:
                    rec[1][:] = [store.resolve(seq) for seq in rec[1]]
            tree.apply(delta, layer=index)
            blob = BlobFile(record.path, record.sha256, record.compressed_size) if record else None
            stats.layers.append(
                LayerStats(
                    index=index,
                    compression=digests.compression,
                    compressed_size=digests.compressed_size,
                    compressed_digest="sha256:" + digests.compressed_sha256,
                    diff_id=digests.diff_id,
                    tar_size=digests.tar_size,
                    entries=entries,
                    files=files,
                    file_bytes=file_bytes,
                    chunks=store.total_chunks - first_chunk,
                    new_chunks=len(store.chunks) - first_unique,
                    blob=blob,
                )
            )
    finally:
        store.close()

    data, missing = write_bootstrap(
        tree,
        store.chunks,
        store.blobs,
        digester=digester,
        chunk_size=cs,
        prefetch=list(opts.prefetch_files),
    )
    bootstrap_path = out_dir / BOOTSTRAP_NAME
    tmp = out_dir / (BOOTSTRAP_NAME + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, bootstrap_path)

    _tree_stats(tree, stats)
    stats.entries = sum(layer.entries for layer in stats.layers)
    stats.chunks = store.total_chunks
    stats.chunk_bytes = store.total_bytes
    stats.unique_chunks = len(store.chunks)
    stats.unique_bytes = sum(c.uncompressed_size for c in store.chunks)
    stats.compressed_bytes = sum(b.compressed_size for b in store.blobs)
    stats.bootstrap_size = len(data)
    stats.source_compressed_bytes = sum(layer.compressed_size for layer in stats.layers)
    stats.tar_bytes = sum(layer.tar_size for layer in stats.layers)
    stats.prefetch_missing = missing
    stats.elapsed_seconds = time.perf_counter() - started
    return ConversionResult(
        bootstrap_path=bootstrap_path,
        bootstrap_sha256=hashlib.sha256(data).hexdigest(),
        bootstrap_size=len(data),
        blobs=[BlobFile(b.path, b.sha256, b.compressed_size) for b in store.blobs],
        stats=stats,
    )


def _tree_stats(tree: MergedTree, stats: ConversionStats) -> None:
    seen: set[int] = set()
    names = 0
    for _path, node in tree.walk():
        names += 1
        if id(node) in seen:
            stats.hardlinks += 1
            continue
        seen.add(id(node))
        if node.kind is EntryKind.REG:
            stats.files += 1
            stats.file_bytes += node.size
        elif node.kind is EntryKind.DIR:
            stats.directories += 1
        elif node.kind is EntryKind.SYMLINK:
            stats.symlinks += 1
        elif node.kind in (EntryKind.CHR, EntryKind.BLK):
            stats.devices += 1
        elif node.kind is EntryKind.FIFO:
            stats.fifos += 1
    stats.inodes = len(seen)
