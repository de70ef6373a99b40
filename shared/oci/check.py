"""``check``: prove a converted image equals its source, file by file and byte by byte.

The source side is ``reference_tree`` over the source layers (tarfile in random-access mode and a flat
path dict); the converted side is ``ImageTree`` over the downloaded bootstrap and blobs, reading every
regular file back through the chunk table, decompressing and verifying every chunk.  Two independent
code paths, so a converter bug shows up as a difference instead of being reproduced on both sides.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import io
import tarfile
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import zstandard

from shared.image_format import (
    Bootstrap,
    CorruptLayerError,
    ImageTree,
    LocalBlobSource,
    TreeDifference,
    compare_trees,
    reference_tree,
)
from shared.image_format.check import TreeEntry

from .convert import RUNTIME_CONFIG_KEYS, CountingRaw, damselfly_layers, fetch_layers, source_layers
from .manifest import Platform
from .mediatypes import ANNOTATION_SOURCE_DIGEST
from .progress import NULL_TASK, NullProgress, Progress, ProgressTask
from .store import ImageStore, ResolvedImage

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass
class CheckReport:
    """The outcome of a check: equal when there are no differences and no problems."""

    source: str
    source_digest: str
    target: str
    target_digest: str
    paths: int = 0
    files: int = 0
    file_bytes: int = 0
    differences: list[TreeDifference] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the converted image is equivalent to the source."""
        return not self.differences and not self.problems

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form (``--output-json``)."""
        return {
            "ok": self.ok,
            "source": self.source,
            "source_digest": self.source_digest,
            "target": self.target,
            "target_digest": self.target_digest,
            "paths": self.paths,
            "files": self.files,
            "file_bytes": self.file_bytes,
            "problems": list(self.problems),
            "differences": [
                {"path": d.path, "field": d.field, "expected": plain(d.expected), "actual": plain(d.actual)}
                for d in self.differences
            ],
            "seconds": self.seconds,
        }


def plain(value: object) -> object:
    """A JSON-friendly form of a tree field value (enums by name, bytes as base64)."""
    if isinstance(value, enum.Enum):
        return value.name.lower()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    return value


def config_problems(source: ResolvedImage, target: ResolvedImage) -> list[str]:
    """Differences in what a runtime would run, and in how the target describes its own layers."""
    problems = []
    src_cfg = source.config.get("config") or {}
    tgt_cfg = target.config.get("config") or {}
    for key in RUNTIME_CONFIG_KEYS:
        if src_cfg.get(key) != tgt_cfg.get(key):
            problems.append(f"config.{key}: expected {src_cfg.get(key)!r}, got {tgt_cfg.get(key)!r}")
    for key in ("os", "architecture", "variant"):
        if source.config.get(key) != target.config.get(key):
            problems.append(f"{key}: expected {source.config.get(key)!r}, got {target.config.get(key)!r}")
    diff_ids = (target.config.get("rootfs") or {}).get("diff_ids")
    if diff_ids != [d.digest for d in target.manifest.layers]:
        problems.append("rootfs.diff_ids do not list the target's layer digests")
    claimed = target.manifest.annotations.get(ANNOTATION_SOURCE_DIGEST)
    if claimed is not None and claimed != source.digest:
        problems.append(f"the target was converted from {claimed}, not from the source image {source.digest}")
    return problems


def bootstrap_problems(boot: Bootstrap, blobs: Sequence[Any]) -> list[str]:
    """The bootstrap's blob table must name exactly the manifest's data blobs, in order, with their sizes."""
    table = [(b.digest, b.compressed_size) for b in boot.blobs]
    listed = [(d.digest, d.size) for d in blobs]
    if table != listed:
        return [f"the bootstrap's blob table {table} does not match the manifest's data blobs {listed}"]
    return []


def _walk_target(boot: Bootstrap, source: LocalBlobSource, task: ProgressTask) -> dict[str, TreeEntry]:
    entries = {}
    for entry in ImageTree(boot, source).walk(with_content=False):
        entries[entry.path] = entry
        task.advance(1)
    return entries


def _seekable_tar(path: Path, work: Path, task: ProgressTask) -> tuple[Path, bool]:
    """The layer as tarfile can open it, and whether reading it was already counted on ``task``.

    Python 3.11's tarfile cannot read zstd, so zstd layers are decompressed into the work dir first
    (their progress counted as they are decompressed).
    """
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != _ZSTD_MAGIC:
        return path, False
    plain = work / (path.name + ".tar")
    with path.open("rb") as src, plain.open("wb") as dst:
        reader = io.BufferedReader(CountingRaw(src, task))
        try:
            zstandard.ZstdDecompressor().copy_stream(reader, dst)
        except zstandard.ZstdError as exc:
            raise CorruptLayerError(f"zstd layer {path.name} does not decompress: {exc}") from None
    return plain, True


def _reference(paths: Sequence[Path], work: Path, task: ProgressTask) -> dict[str, TreeEntry]:
    with contextlib.ExitStack() as stack:
        readers: list[IO[bytes]] = []
        for path in paths:
            plain, counted = _seekable_tar(path, work, task)
            raw = CountingRaw(stack.enter_context(plain.open("rb")), NULL_TASK if counted else task)
            readers.append(stack.enter_context(io.BufferedReader(raw, buffer_size=1 << 20)))
        try:
            return reference_tree(readers)
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            # The converter's own reader already accepted these layers, so this is rare; still one clear error.
            raise CorruptLayerError(f"the reference reader cannot read a source layer: {exc}") from None


async def check_image(
    source: ImageStore,
    target: ImageStore,
    platform: Platform,
    *,
    work_parent: Path | None = None,
    progress: Progress | None = None,
) -> CheckReport:
    """Compare ``target`` (a converted image) with ``source``; the report lists every difference."""
    progress = progress or NullProgress()
    started = time.perf_counter()
    src, tgt = await asyncio.gather(source.resolve(platform), target.resolve(platform))
    report = CheckReport(source.name, src.digest, target.name, tgt.digest)
    layers = source_layers(src)
    blobs, boot_desc = damselfly_layers(tgt.manifest.layers, target.name)
    report.problems += config_problems(src, tgt)
    with tempfile.TemporaryDirectory(prefix="damselfly-check-", dir=work_parent) as tmp:
        work = Path(tmp)
        src_paths, tgt_paths = await asyncio.gather(
            fetch_layers(source, layers, work / "source", progress),
            fetch_layers(target, [*blobs, boot_desc], work / "target", progress, label="pull converted"),
        )
        boot = await asyncio.to_thread(Bootstrap.load, tgt_paths[-1])
        await asyncio.to_thread(boot.validate)
        report.problems += bootstrap_problems(boot, blobs)
        blob_files = {d.digest: p for d, p in zip(blobs, tgt_paths, strict=False)}
        with LocalBlobSource(files=blob_files) as blob_source:
            src_task = progress.task("read source layers", sum(d.size for d in layers))
            # Every path is one dirent, plus the root.
            tgt_task = progress.task("read converted files", boot.dirent_count + 1, unit="items")
            try:
                expected, actual = await asyncio.gather(
                    asyncio.to_thread(_reference, src_paths, work, src_task),
                    asyncio.to_thread(_walk_target, boot, blob_source, tgt_task),
                )
            finally:
                src_task.done()
                tgt_task.done()
    report.differences = compare_trees(expected, actual)
    report.paths = len(actual)
    regular = [e for e in actual.values() if e.content_sha256 is not None]
    report.files = len(regular)
    report.file_bytes = sum(e.size for e in regular)
    report.seconds = round(time.perf_counter() - started, 3)
    return report
