"""Verification helpers: walk a converted image, rebuild the source tree independently, compare.

``ImageTree`` walks bootstrap + blobs (the converted side).  ``reference_tree`` applies the source layers
with a deliberately separate, simple implementation: tarfile in random-access mode instead of the streaming
reader, and a flat ``path -> record`` dict instead of the inode tree, so a bug in the converter's merge
logic shows up as a difference rather than being reproduced on both sides.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal
from typing import IO
from urllib.parse import unquote_to_bytes

from .bootstrap import Bootstrap, FileType
from .errors import HardLinkError, PathConflictError, UnsafePathError
from .reader import BlobSource, read_file
from .tar_reader import LayerInput


@dataclass(frozen=True)
class TreeEntry:
    """One path of an image tree, as ``check`` compares it (content by sha256)."""

    path: str
    type: FileType
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    nlink: int
    link_target: str | None = None
    rdev: tuple[int, int] | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()
    content_sha256: str | None = None
    content: bytes | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class TreeDifference:
    """One difference between an expected and an actual tree."""

    path: str
    field: str
    expected: object
    actual: object

    def __str__(self) -> str:
        return f"{self.path}: {self.field}: expected {self.expected!r}, got {self.actual!r}"


class ImageTree:
    """The merged tree of a converted image, read back through its bootstrap and blobs."""

    def __init__(self, bootstrap: Bootstrap, source: BlobSource) -> None:
        self.bootstrap = bootstrap
        self.source = source

    def walk(self, *, with_content: bool = True) -> Iterator[TreeEntry]:
        """Yield every path in depth-first name order; regular files carry content and its sha256."""
        b = self.bootstrap
        for path, node in b.walk():
            content = digest = target = rdev = None
            if node.is_reg:
                data = read_file(b, self.source, node.ino)
                digest = hashlib.sha256(data).hexdigest()
                content = data if with_content else None
            elif node.is_symlink:
                target = b.readlink(node.ino)
            elif node.type in (FileType.CHR, FileType.BLK):
                rdev = (node.rdev_major, node.rdev_minor)
            yield TreeEntry(
                path=path,
                type=node.type,
                mode=node.permissions,
                uid=node.uid,
                gid=node.gid,
                size=node.size,
                mtime_ns=node.mtime_ns,
                nlink=node.nlink,
                link_target=target,
                rdev=rdev,
                xattrs=tuple(sorted(b.xattrs(node.ino).items())),
                content_sha256=digest,
                content=content,
            )

    def entries(self) -> dict[str, TreeEntry]:
        """All entries keyed by path, without content bytes (digests only)."""
        return {e.path: e for e in self.walk(with_content=False)}


# --------------------------------------------------------------------------------------------------
# Reference: apply layers on a flat path dict, metadata and content digests only.


class _Rec:
    """Mutable record of one path; hard links share one _Rec object."""

    def __init__(self, type_: FileType, mode: int = 0o755) -> None:
        self.type = type_
        self.mode = mode
        self.uid = self.gid = 0
        self.mtime_ns = 0
        self.size = 0
        self.target: str | None = None
        self.rdev: tuple[int, int] | None = None
        self.xattrs: dict[str, bytes] = {}
        self.sha: str | None = None


_TYPES = {
    tarfile.DIRTYPE: FileType.DIR,
    tarfile.SYMTYPE: FileType.SYMLINK,
    tarfile.CHRTYPE: FileType.CHR,
    tarfile.BLKTYPE: FileType.BLK,
    tarfile.FIFOTYPE: FileType.FIFO,
}


def _key(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafePathError("entry name contains '..'", entry=name)
    return "/" + "/".join(parts)


def _parent(key: str) -> str:
    return key.rsplit("/", 1)[0] or "/"


def _meta(rec: _Rec, info: tarfile.TarInfo) -> None:
    rec.mode = info.mode & 0o7777
    rec.uid, rec.gid = info.uid, info.gid
    if "mtime" in info.pax_headers:
        exact = Decimal(info.pax_headers["mtime"]) * 1_000_000_000
        rec.mtime_ns = int(exact.to_integral_value(rounding=ROUND_FLOOR))
    else:
        rec.mtime_ns = int(info.mtime) * 1_000_000_000
    xattrs: dict[str, bytes] = {}
    for k, v in info.pax_headers.items():
        if k.startswith("LIBARCHIVE.xattr."):
            xattrs[unquote_to_bytes(k[17:]).decode("utf-8", "surrogateescape")] = base64.b64decode(v)
    for k, v in info.pax_headers.items():
        if k.startswith("SCHILY.xattr."):
            xattrs[k[13:]] = v.encode("utf-8", "surrogateescape")
    rec.xattrs = xattrs


def _open(layer: LayerInput) -> tuple[IO[bytes], bool]:
    if isinstance(layer, bytes | bytearray | memoryview):
        return io.BytesIO(bytes(layer)), True
    if isinstance(layer, str | os.PathLike):
        return open(layer, "rb"), True
    return layer, False


def reference_tree(layers: Iterable[LayerInput]) -> dict[str, TreeEntry]:
    """Apply layers (seekable inputs) the simple way and return path -> entry, with content digests."""
    state: dict[str, _Rec] = {"/": _Rec(FileType.DIR)}

    def drop_children(key: str) -> None:
        prefix = "/" if key == "/" else key + "/"
        for k in [k for k in state if k != key and k.startswith(prefix)]:
            del state[k]

    def drop(key: str) -> None:
        old = state.pop(key, None) if key != "/" else state[key]
        if old is not None and old.type is FileType.DIR:
            drop_children(key)

    def parents(key: str) -> None:
        chain = []
        k = _parent(key)
        while k != "/":
            chain.append(k)
            k = _parent(k)
        for k in reversed(chain):
            rec = state.get(k)
            if rec is None:
                state[k] = _Rec(FileType.DIR)
            elif rec.type is not FileType.DIR:
                raise PathConflictError(f"{k} is not a directory", entry=key)

    for layer in layers:
        # OCI: a layer's whiteouts hide lower-layer content only, so they run before its entries.
        opaque: list[str] = []
        whiteouts: list[str] = []
        ops: list[tuple[str, tarfile.TarInfo | None, str | None]] = []
        fileobj, owned = _open(layer)
        try:
            with tarfile.open(fileobj=fileobj, mode="r:*", encoding="utf-8", errors="surrogateescape") as tf:
                for info in tf:
                    key = _key(info.name)
                    base = key.rsplit("/", 1)[1]
                    if base == ".wh..wh..opq":
                        opaque.append(_parent(key))
                        ops.append((key, None, None))
                    elif base.startswith(".wh..wh.") or "/.wh..wh." in key:
                        continue
                    elif base.startswith(".wh."):
                        whiteouts.append(_parent(key).rstrip("/") + "/" + base[4:])
                        ops.append((key, None, None))
                    else:
                        sha = None
                        if info.isreg():
                            f = tf.extractfile(info)
                            assert f is not None
                            sha = hashlib.sha256(f.read()).hexdigest()
                        ops.append((key, info, sha))
        finally:
            if owned:
                fileobj.close()
        for key in opaque:
            if key in state and state[key].type is FileType.DIR:
                drop_children(key)
        for key in whiteouts:
            drop(key)
        for key, maybe_info, sha in ops:
            parents(key)
            if maybe_info is None:  # a whiteout marker: only its parent directories matter now
                continue
            info = maybe_info
            old = state.get(key)
            if info.isdir() and old is not None and old.type is FileType.DIR:
                _meta(old, info)
                continue
            if key == "/":
                raise PathConflictError("root replaced by a non-directory", entry=info.name)
            if info.islnk():
                target = state.get(_key(info.linkname))
                if target is None or target.type is FileType.DIR:
                    raise HardLinkError("bad hard link", entry=info.name)
                drop(key)
                state[key] = target
                continue
            rec = _Rec(FileType.REG if info.isreg() else _TYPES[info.type])
            _meta(rec, info)
            if info.isreg():
                rec.size, rec.sha = info.size, sha
            elif info.issym():
                rec.target = info.linkname
                rec.size = len(info.linkname.encode("utf-8", "surrogateescape"))
            elif info.ischr() or info.isblk():
                rec.rdev = (info.devmajor, info.devminor)
            drop(key)
            state[key] = rec

    links: dict[int, int] = {}
    subdirs: dict[str, int] = {}
    for key, rec in state.items():
        if rec.type is FileType.DIR:
            if key != "/":
                subdirs[_parent(key)] = subdirs.get(_parent(key), 0) + 1
        else:
            links[id(rec)] = links.get(id(rec), 0) + 1
    out = {}
    for key, rec in state.items():
        nlink = 2 + subdirs.get(key, 0) if rec.type is FileType.DIR else links[id(rec)]
        out[key] = TreeEntry(
            path=key,
            type=rec.type,
            mode=rec.mode,
            uid=rec.uid,
            gid=rec.gid,
            size=rec.size,
            mtime_ns=rec.mtime_ns,
            nlink=nlink,
            link_target=rec.target,
            rdev=rec.rdev,
            xattrs=tuple(sorted(rec.xattrs.items())),
            content_sha256=rec.sha,
        )
    return out


def compare_trees(
    expected: Mapping[str, TreeEntry] | Iterable[TreeEntry],
    actual: Mapping[str, TreeEntry] | Iterable[TreeEntry],
) -> list[TreeDifference]:
    """Differences between two trees, path by path and field by field (content by sha256)."""
    exp = expected if isinstance(expected, Mapping) else {e.path: e for e in expected}
    act = actual if isinstance(actual, Mapping) else {e.path: e for e in actual}
    diffs: list[TreeDifference] = []
    for path in sorted(exp.keys() | act.keys()):
        a, b = exp.get(path), act.get(path)
        if a is None or b is None:
            diffs.append(TreeDifference(path, "presence", a is not None, b is not None))
            continue
        for name in ("type", "mode", "uid", "gid", "size", "mtime_ns", "nlink", "link_target", "rdev", "xattrs"):
            if getattr(a, name) != getattr(b, name):
                diffs.append(TreeDifference(path, name, getattr(a, name), getattr(b, name)))
        if a.content_sha256 != b.content_sha256:
            diffs.append(TreeDifference(path, "content_sha256", a.content_sha256, b.content_sha256))
    return diffs
