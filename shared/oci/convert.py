"""``convert``: pull an OCI image, convert its layers to the lazy format, push bootstrap + blobs as a new image.

The target is an ordinary OCI image manifest, so any registry stores and serves it (docs/convert.md)::

    layers:  data blob 1 .. data blob n   application/vnd.damselfly.image.blob.v1
             bootstrap                    application/vnd.damselfly.image.bootstrap.v1   (always last)
    config:  the source config, rootfs.diff_ids = the layer digests, history = one entry per layer

Everything the conversion writes goes into a temporary work directory that is removed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import io
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from shared.errors import BlobDigestMismatch, InvalidRequest
from shared.image_format import (
    Bootstrap,
    ConversionOptions,
    ConversionResult,
    LayerError,
    convert_layers,
)
from shared.image_format.bootstrap import VERSION_MAJOR, VERSION_MINOR
from shared.image_format.compression import Compressor
from shared.image_format.digest import Digester

from .manifest import Descriptor, Platform, canonical_json, encode_manifest, sha256_digest
from .mediatypes import (
    ANNOTATION_BLOB_CHUNKS,
    ANNOTATION_BLOB_UNCOMPRESSED_SIZE,
    ANNOTATION_BOOTSTRAP,
    ANNOTATION_CHUNK_SIZE,
    ANNOTATION_COMPRESSOR,
    ANNOTATION_DIGESTER,
    ANNOTATION_FORMAT_VERSION,
    ANNOTATION_SOURCE_DIGEST,
    ANNOTATION_SOURCE_LAYER,
    DAMSELFLY_BLOB,
    DAMSELFLY_BOOTSTRAP,
    DAMSELFLY_LAYER_TYPES,
    OCI_CONFIG,
    OCI_MANIFEST,
    SOURCE_LAYER_TYPES,
)
from .progress import NULL_TASK, NullProgress, Progress, ProgressTask
from .store import ImageStore, ResolvedImage, sha256_file

FORMAT_VERSION = f"{VERSION_MAJOR}.{VERSION_MINOR}"
DEFAULT_PLATFORM = Platform("linux", "amd64")
#: Blobs pulled or pushed at once: enough to overlap round trips, few enough to share two cores.
TRANSFER_CONCURRENCY = 3

#: Config fields a runtime uses to run the image; ``check`` compares them between source and target.
RUNTIME_CONFIG_KEYS = (
    "User",
    "ExposedPorts",
    "Env",
    "Entrypoint",
    "Cmd",
    "Volumes",
    "WorkingDir",
    "Labels",
    "StopSignal",
    "Shell",
    "Healthcheck",
)


@dataclass(frozen=True)
class ConvertSettings:
    """What to convert for, and how."""

    platform: Platform = DEFAULT_PLATFORM
    options: ConversionOptions = field(default_factory=ConversionOptions)
    #: Parent of the temporary work directory (default: the system temp dir).
    work_parent: Path | None = None


@dataclass
class ConvertReport:
    """What a conversion read, produced and pushed."""

    source: str
    source_digest: str
    target: str
    target_digest: str
    config_digest: str
    source_layers: list[dict[str, Any]]
    blobs: list[dict[str, Any]]
    bootstrap: dict[str, Any]
    stats: dict[str, Any]
    seconds: dict[str, float]
    uploaded_blobs: int

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form (``--output-json``)."""
        return dict(self.__dict__)


def damselfly_layers(manifest_layers: Sequence[Descriptor], name: str) -> tuple[list[Descriptor], Descriptor]:
    """Split a converted image's layers into data blobs and the bootstrap (InvalidRequest if not converted)."""
    boots = [d for d in manifest_layers if d.media_type == DAMSELFLY_BOOTSTRAP]
    if not boots:
        raise InvalidRequest(f"{name} is not a Damselfly image (no layer of type {DAMSELFLY_BOOTSTRAP})")
    if len(boots) > 1 or manifest_layers[-1] is not boots[0]:
        raise InvalidRequest(f"{name}: a Damselfly image has exactly one bootstrap, as its last layer")
    blobs = list(manifest_layers[:-1])
    for d in blobs:
        if d.media_type != DAMSELFLY_BLOB:
            raise InvalidRequest(f"{name}: unexpected layer type {d.media_type!r} in a Damselfly image")
    return blobs, boots[0]


def source_layers(image: ResolvedImage) -> list[Descriptor]:
    """The image's layers, checked to be tar layers the converter reads."""
    layers = list(image.manifest.layers)
    for d in layers:
        if d.media_type in DAMSELFLY_LAYER_TYPES:
            raise InvalidRequest(f"{image.name} is already a Damselfly image; convert its source instead")
        if d.media_type not in SOURCE_LAYER_TYPES:
            raise InvalidRequest(f"{image.name}: layer {d.digest} has unsupported media type {d.media_type!r}")
        if d.urls:
            raise InvalidRequest(f"{image.name}: layer {d.digest} is a foreign layer (urls); not supported")
    return layers


def converted_config(source_config: dict[str, Any], layers: Sequence[Descriptor]) -> bytes:
    """The target's config: the source's, with rootfs and history describing the new layers.

    The new layers are not tars, but OCI defines a diff_id as the digest of the layer's uncompressed
    content, and blobs and bootstrap are stored uncompressed, so each diff_id equals the layer digest.
    The source's history is replaced because its entries describe layers that are no longer there.
    """
    config = copy.deepcopy(source_config)
    config["rootfs"] = {"type": "layers", "diff_ids": [d.digest for d in layers]}
    config["history"] = [
        {
            "created_by": "damselfly convert",
            "comment": "bootstrap" if d.media_type == DAMSELFLY_BOOTSTRAP else "data blob",
        }
        for d in layers
    ]
    return canonical_json(config)


async def fetch_layers(
    store: ImageStore,
    layers: Sequence[Descriptor],
    directory: Path,
    progress: Progress,
    *,
    verify: bool = True,
    label: str = "pull",
) -> list[Path]:
    """Fetch layers concurrently into ``directory`` (one bar each); paths in layer order."""
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    limit = asyncio.Semaphore(TRANSFER_CONCURRENCY)

    async def one(i: int, desc: Descriptor) -> Path:
        async with limit:
            task = progress.task(f"{label} {desc.digest[7:19]} ({i + 1}/{len(layers)})", desc.size)
            try:
                return await store.fetch_blob(desc, directory, task, verify=verify)
            finally:
                task.done()

    return list(await asyncio.gather(*(one(i, d) for i, d in enumerate(layers))))


class CountingRaw(io.RawIOBase):
    """A seekable raw reader over an open binary file that reports every byte read to a progress bar.

    Wrapped in ``io.BufferedReader`` it is what the converter and ``reference_tree`` read; ``advance`` runs
    on their worker thread, which the progress protocol allows.
    """

    def __init__(self, file: io.BufferedIOBase, task: ProgressTask) -> None:
        self._file = file
        self._task = task

    def readable(self) -> bool:
        """Always readable."""
        return True

    def seekable(self) -> bool:
        """Seekable: ``reference_tree`` opens layers with tarfile in random-access mode."""
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Seek the underlying file."""
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        """Position in the underlying file."""
        return self._file.tell()

    def readinto(self, buffer: Any) -> int:
        """Read into ``buffer`` and count the bytes."""
        n = self._file.readinto(buffer)
        self._task.advance(n)
        return n

    def close(self) -> None:
        """Close the underlying file too."""
        self._file.close()
        super().close()


@contextlib.contextmanager
def counting_readers(paths: Sequence[Path], task: ProgressTask) -> Iterator[list[IO[bytes]]]:
    """Buffered readers of ``paths`` that advance ``task`` as the converter consumes them."""
    with contextlib.ExitStack() as stack:
        readers: list[IO[bytes]] = []
        for path in paths:
            reader = io.BufferedReader(CountingRaw(path.open("rb"), task), buffer_size=1 << 20)
            stack.callback(reader.close)
            readers.append(reader)
        yield readers


def _convert(
    paths: Sequence[Path], layers: Sequence[Descriptor], out: Path, options: ConversionOptions, task: ProgressTask
) -> ConversionResult:
    with counting_readers(paths, task) as readers:
        try:
            result = convert_layers(readers, out, options)
        except LayerError as exc:
            if exc.layer is not None and 0 <= exc.layer < len(layers):
                desc = layers[exc.layer]
                # A layer that fails to parse may simply not be the layer the manifest names: say so,
                # since that is the real fault (and the one a user can act on).
                actual, _size = sha256_file(paths[exc.layer], NULL_TASK)
                if actual != desc.digest:
                    raise BlobDigestMismatch(desc.digest, actual, what=f"layer {exc.layer}") from exc
                exc.add_note(f"source layer {desc.digest}")
            raise
    # The converter hashed every layer as it streamed it: the digest check of local layers costs nothing.
    for desc, stats in zip(layers, result.stats.layers, strict=True):
        if stats.compressed_digest != desc.digest or stats.compressed_size != desc.size:
            raise BlobDigestMismatch(desc.digest, stats.compressed_digest, what=f"layer {stats.index}")
    return result


def build_target(
    image: ResolvedImage, layers: Sequence[Descriptor], result: ConversionResult, options: ConversionOptions
) -> tuple[list[tuple[Descriptor, Path]], tuple[Descriptor, bytes], bytes]:
    """The target's layer blobs (descriptor, file), its config (descriptor, bytes) and its manifest bytes."""
    compressor = Compressor.parse(options.compressor).value
    digester = Digester.parse(options.digester).value
    common = {
        ANNOTATION_FORMAT_VERSION: FORMAT_VERSION,
        ANNOTATION_CHUNK_SIZE: str(options.chunk_size),
        ANNOTATION_COMPRESSOR: compressor,
        ANNOTATION_DIGESTER: digester,
    }
    info = {b.sha256: b for b in Bootstrap.load(result.bootstrap_path, verify=False).blobs}
    files: list[tuple[Descriptor, Path]] = []
    for desc, stats in zip(layers, result.stats.layers, strict=True):
        if stats.blob is None:
            continue
        blob = info[stats.blob.sha256]
        annotations = {
            **common,
            ANNOTATION_BLOB_UNCOMPRESSED_SIZE: str(blob.uncompressed_size),
            ANNOTATION_BLOB_CHUNKS: str(blob.chunk_count),
            ANNOTATION_SOURCE_LAYER: desc.digest,
        }
        files.append((Descriptor(DAMSELFLY_BLOB, stats.blob.digest, stats.blob.size, annotations), stats.blob.path))
    boot_annotations = {**common, ANNOTATION_BOOTSTRAP: "true", ANNOTATION_SOURCE_DIGEST: image.digest}
    boot = Descriptor(DAMSELFLY_BOOTSTRAP, result.bootstrap_digest, result.bootstrap_size, boot_annotations)
    files.append((boot, result.bootstrap_path))
    config_raw = converted_config(image.config, [d for d, _ in files])
    config = Descriptor(OCI_CONFIG, sha256_digest(config_raw), len(config_raw))
    manifest = encode_manifest(
        config,
        [d for d, _ in files],
        {ANNOTATION_FORMAT_VERSION: FORMAT_VERSION, ANNOTATION_SOURCE_DIGEST: image.digest},
    )
    return files, (config, config_raw), manifest


async def push_image(
    target: ImageStore,
    files: Sequence[tuple[Descriptor, Path]],
    config: tuple[Descriptor, bytes],
    manifest: bytes,
    work: Path,
    progress: Progress,
) -> tuple[str, int]:
    """Push blobs (concurrently), then the config, then the manifest; returns (digest, blobs uploaded)."""
    limit = asyncio.Semaphore(TRANSFER_CONCURRENCY)

    async def one(desc: Descriptor, path: Path) -> bool:
        async with limit:
            kind = "bootstrap" if desc.media_type == DAMSELFLY_BOOTSTRAP else "blob"
            task = progress.task(f"push {kind} {desc.digest[7:19]}", desc.size)
            try:
                return await target.push_blob(desc, path, task)
            finally:
                task.done()

    config_path = work / "config.json"
    config_path.write_bytes(config[1])
    pushed = await asyncio.gather(*(one(d, p) for d, p in files))
    pushed_config = await target.push_blob(config[0], config_path, NULL_TASK)
    digest = await target.push_manifest(manifest, OCI_MANIFEST)
    return digest, sum(pushed) + int(pushed_config)


async def convert_image(
    source: ImageStore,
    target: ImageStore,
    settings: ConvertSettings | None = None,
    progress: Progress | None = None,
) -> ConvertReport:
    """Pull ``source`` (for the platform), convert it, push the result to ``target``."""
    settings = settings or ConvertSettings()
    progress = progress or NullProgress()
    settings.options.validate()  # bad options fail before any download
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="damselfly-convert-", dir=settings.work_parent) as tmp:
        work = Path(tmp)
        await target.check_writable()
        image = await source.resolve(settings.platform)
        layers = source_layers(image)
        # Local layouts are read in place and hashed by the converter itself (verify=False saves a pass).
        paths = await fetch_layers(source, layers, work / "layers", progress, verify=False)
        pulled = time.perf_counter()
        task = progress.task("convert", sum(d.size for d in layers))
        try:
            result = await asyncio.to_thread(_convert, paths, layers, work / "out", settings.options, task)
        finally:
            task.done()
        converted = time.perf_counter()
        files, config, manifest = build_target(image, layers, result, settings.options)
        digest, uploaded = await push_image(target, files, config, manifest, work, progress)
        finished = time.perf_counter()
    stats = result.stats
    return ConvertReport(
        source=source.name,
        source_digest=image.digest,
        target=target.name,
        target_digest=digest,
        config_digest=config[0].digest,
        source_layers=[
            {
                "digest": d.digest,
                "size": d.size,
                "media_type": d.media_type,
                "compression": s.compression.value,
                "tar_size": s.tar_size,
                "diff_id": s.diff_id,
                "entries": s.entries,
                "files": s.files,
                "chunks": s.chunks,
                "new_chunks": s.new_chunks,
                "blob": s.blob.digest if s.blob else None,
            }
            for d, s in zip(layers, stats.layers, strict=True)
        ],
        blobs=[
            {"digest": d.digest, "size": d.size, "media_type": d.media_type, "annotations": dict(d.annotations)}
            for d, _ in files
        ],
        bootstrap={"digest": result.bootstrap_digest, "size": result.bootstrap_size},
        stats={
            "entries": stats.entries,
            "inodes": stats.inodes,
            "files": stats.files,
            "directories": stats.directories,
            "symlinks": stats.symlinks,
            "hardlinks": stats.hardlinks,
            "file_bytes": stats.file_bytes,
            "chunks": stats.chunks,
            "unique_chunks": stats.unique_chunks,
            "chunk_bytes": stats.chunk_bytes,
            "unique_bytes": stats.unique_bytes,
            "dedup_ratio": round(stats.dedup_ratio, 4),
            "source_compressed_bytes": stats.source_compressed_bytes,
            "tar_bytes": stats.tar_bytes,
            "blob_bytes": stats.compressed_bytes,
            "target_bytes": stats.compressed_bytes + result.bootstrap_size,
            "conversion_mb_s": round(stats.throughput_mb_s, 1),
            "prefetch_missing": list(stats.prefetch_missing),
        },
        seconds={
            "pull": round(pulled - started, 3),
            "convert": round(converted - pulled, 3),
            "push": round(finished - converted, 3),
            "total": round(finished - started, 3),
        },
        uploaded_blobs=uploaded,
    )
