"""Builders of synthetic layer tars (in memory) and a conversion shortcut for the image_format tests."""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shared.image_format import (
    Bootstrap,
    ConversionOptions,
    ConversionResult,
    LayerInput,
    LocalBlobSource,
    TreeEntry,
    convert_layers,
)
from shared.image_format.check import ImageTree

KIB = 1024
SMALL_CHUNK = 4 * KIB


@dataclass
class Spec:
    """One tar entry to write."""

    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = 1_700_000_000
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    pax: dict[str, str] = field(default_factory=dict)


def f(name: str, data: bytes = b"", **kw: object) -> Spec:
    """Regular file."""
    return Spec(name, tarfile.REGTYPE, data, **kw)  # type: ignore[arg-type]


def d(name: str, **kw: object) -> Spec:
    """Directory."""
    kw.setdefault("mode", 0o755)
    return Spec(name, tarfile.DIRTYPE, **kw)  # type: ignore[arg-type]


def sym(name: str, target: str, **kw: object) -> Spec:
    """Symlink."""
    kw.setdefault("mode", 0o777)
    return Spec(name, tarfile.SYMTYPE, linkname=target, **kw)  # type: ignore[arg-type]


def hl(name: str, target: str, **kw: object) -> Spec:
    """Hard link."""
    return Spec(name, tarfile.LNKTYPE, linkname=target, **kw)  # type: ignore[arg-type]


def chr_dev(name: str, major: int, minor: int) -> Spec:
    """Character device."""
    return Spec(name, tarfile.CHRTYPE, mode=0o666, devmajor=major, devminor=minor)


def blk_dev(name: str, major: int, minor: int) -> Spec:
    """Block device."""
    return Spec(name, tarfile.BLKTYPE, mode=0o660, devmajor=major, devminor=minor)


def fifo(name: str) -> Spec:
    """Named pipe."""
    return Spec(name, tarfile.FIFOTYPE, mode=0o600)


def wh(path: str) -> Spec:
    """OCI whiteout for ``path`` (``dir/.wh.name``)."""
    parent, _, base = path.rstrip("/").rpartition("/")
    return f(f"{parent}/.wh.{base}" if parent else f".wh.{base}")


def opq(directory: str) -> Spec:
    """OCI opaque marker for ``directory``."""
    return f(f"{directory.rstrip('/')}/.wh..wh..opq")


def make_tar(
    specs: Iterable[Spec], *, fmt: int = tarfile.PAX_FORMAT, compress: bool = False, eof: bool = True
) -> bytes:
    """Tar (optionally gzip) bytes holding ``specs`` in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for s in specs:
            info = tarfile.TarInfo(s.name)
            info.type = s.type
            info.mode = s.mode
            info.uid, info.gid = s.uid, s.gid
            info.mtime = s.mtime
            info.linkname = s.linkname
            info.devmajor, info.devminor = s.devmajor, s.devminor
            info.pax_headers = dict(s.pax)
            if s.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                info.size = len(s.data)
                tf.addfile(info, io.BytesIO(s.data))
            else:
                tf.addfile(info)
    raw = buf.getvalue()
    if not eof:
        raw = raw.rstrip(b"\x00")
        raw += b"\x00" * (-len(raw) % 512)
    # gzip mtime=0 keeps the layer bytes themselves reproducible.
    return gzip.compress(raw, mtime=0) if compress else raw


@dataclass
class Converted:
    """A finished conversion with its bootstrap loaded and a blob source open."""

    result: ConversionResult
    boot: Bootstrap
    source: LocalBlobSource
    work_dir: Path

    def tree(self) -> dict[str, TreeEntry]:
        """Every path with content, from the converted side."""
        return {e.path: e for e in ImageTree(self.boot, self.source).walk()}

    def content(self, path: str) -> bytes:
        """Content of a regular file (follows symlinks)."""
        from shared.image_format import read_file

        return read_file(self.boot, self.source, self.boot.lookup(path, follow_symlinks=True))


def convert(work_dir: Path, layers: Sequence[LayerInput], **options: object) -> Converted:
    """Convert layers with small chunks by default; returns everything a test needs."""
    options.setdefault("chunk_size", SMALL_CHUNK)
    options.setdefault("workers", 0)
    result = convert_layers(layers, work_dir, ConversionOptions(**options))  # type: ignore[arg-type]
    boot = Bootstrap.load(result.bootstrap_path)
    boot.validate()
    return Converted(result, boot, LocalBlobSource(work_dir / "blobs" / "sha256"), work_dir)
