"""``inspect``: what a converted image holds, read from its manifest and bootstrap alone (no data blob)."""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.image_format import Bootstrap

from .convert import damselfly_layers
from .manifest import Platform
from .mediatypes import ANNOTATION_SOURCE_LAYER
from .progress import NULL_TASK
from .store import ImageStore


@dataclass
class InspectReport:
    """Figures of a converted image; chunk counts are of the merged tree's files (hard links once)."""

    reference: str
    manifest_digest: str
    annotations: dict[str, str]
    command: dict[str, Any]
    format_version: str
    chunk_size: int
    digester: str
    bootstrap: dict[str, Any]
    inodes: int = 0
    paths: int = 0
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    other: int = 0
    file_bytes: int = 0
    chunks: int = 0
    unique_chunks: int = 0
    unique_bytes: int = 0
    #: Chunks stored in the blobs that no file of the merged tree uses (content later layers replaced).
    unreferenced_chunks: int = 0
    stored_bytes: int = 0
    blobs: list[dict[str, Any]] = field(default_factory=list)
    prefetch: list[dict[str, Any]] = field(default_factory=list)

    @property
    def dedup_ratio(self) -> float:
        """Bytes of file chunks / bytes of unique chunks (1.0: no duplicate content)."""
        return self.file_bytes / self.unique_bytes if self.unique_bytes else 1.0

    @property
    def compressed_bytes(self) -> int:
        """Sum of the data blobs' sizes."""
        return sum(int(b["compressed_size"]) for b in self.blobs)

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form (``--output-json``)."""
        out = dict(self.__dict__)
        out["dedup_ratio"] = round(self.dedup_ratio, 4)
        out["compressed_bytes"] = self.compressed_bytes
        return out


def describe_bootstrap(boot: Bootstrap, report: InspectReport, source_layers: dict[str, str]) -> None:
    """Fill ``report``'s counts, blob table and prefetch table from a loaded bootstrap."""
    first_path: dict[int, str] = {}
    used: dict[int, int] = {}
    for path, node in boot.walk():
        report.paths += 1
        if node.ino in first_path:
            report.hardlinks += 1
            continue
        first_path[node.ino] = path
        if node.is_reg:
            report.files += 1
            report.file_bytes += node.size
            refs = boot.file_chunks(node.ino)
            report.chunks += len(refs)
            for ref in refs:
                used[ref.chunk.index] = ref.chunk.uncompressed_size
        elif node.is_dir:
            report.directories += 1
        elif node.is_symlink:
            report.symlinks += 1
        else:
            report.other += 1
    report.inodes = len(first_path)
    report.unique_chunks = len(used)
    report.unique_bytes = sum(used.values())
    report.unreferenced_chunks = boot.chunk_count - len(used)
    report.stored_bytes = sum(b.uncompressed_size for b in boot.blobs)
    report.blobs = [
        {
            "digest": b.digest,
            "compressed_size": b.compressed_size,
            "uncompressed_size": b.uncompressed_size,
            "chunks": b.chunk_count,
            "compressor": b.compressor.value,
            "source_layer": source_layers.get(b.digest),
        }
        for b in boot.blobs
    ]
    for ino in boot.prefetch_inodes():
        node = boot.getattr(ino)
        below = [n for _p, n in boot.walk(ino) if n.is_reg] if node.is_dir else [node]
        report.prefetch.append(
            {
                "path": first_path.get(ino, f"<inode {ino}>"),
                "inode": ino,
                "type": node.type.name.lower(),
                "files": len(below),
                "bytes": sum(n.size for n in below),
            }
        )


async def inspect_image(store: ImageStore, platform: Platform, *, work_parent: Path | None = None) -> InspectReport:
    """Fetch a converted image's manifest and bootstrap and describe them."""
    image = await store.resolve(platform)
    blobs, boot_desc = damselfly_layers(image.manifest.layers, store.name)
    with tempfile.TemporaryDirectory(prefix="damselfly-inspect-", dir=work_parent) as tmp:
        path = await store.fetch_blob(boot_desc, Path(tmp), NULL_TASK)
        boot = await asyncio.to_thread(Bootstrap.load, path)
    runtime = image.config.get("config") or {}
    report = InspectReport(
        reference=store.name,
        manifest_digest=image.digest,
        annotations=dict(image.manifest.annotations),
        command={k: runtime.get(k) for k in ("Entrypoint", "Cmd", "WorkingDir", "User") if runtime.get(k)},
        format_version=f"{boot.version[0]}.{boot.version[1]}",
        chunk_size=boot.chunk_size,
        digester=boot.digester.value,
        bootstrap={"digest": boot_desc.digest, "size": boot_desc.size},
    )
    sources = {d.digest: d.annotations.get(ANNOTATION_SOURCE_LAYER, "") for d in blobs}
    await asyncio.to_thread(describe_bootstrap, boot, report, sources)
    return report
