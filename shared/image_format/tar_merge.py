"""In-memory merge of layer entries into one file tree, with OCI whiteout semantics.

Rules (see docs/format.md, "Layer merge rules"):

* A layer's whiteouts (``.wh.NAME``) and opaque markers (``.wh..wh..opq``) apply to the lower layers only,
  whatever their position in the tar, so a layer's changes are collected in a :class:`LayerDelta` and applied
  at the end of the layer: deletions first, then entries in tar order (a later entry for the same path wins).
* Missing parent directories are created (0755, root:root, mtime 0), as Docker does; a parent that exists
  as a non-directory (file, symlink, device) is a :class:`PathConflictError` - symlinks are never followed.
* A non-directory entry replaces whatever was at its path, dropping a replaced directory's subtree; a
  directory entry over a directory only updates the metadata.
* A hard link shares the inode of its target, which must already exist (earlier in this layer or in a lower
  one), must not be a directory, and is found without following symlinks.  The link entry's own header
  metadata is ignored, the target's wins.
* Other ``.wh..wh.*`` names (AUFS metadata) are skipped; a ``.wh.`` name used as a directory is rejected.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .errors import (
    HardLinkError,
    LayerError,
    PathConflictError,
    SymlinkLoopError,
    UnsafePathError,
    UnsupportedEntryError,
)
from .paths import encode_name, join_path
from .tar_reader import EntryKind, TarEntry

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
META_PREFIX = ".wh..wh."
MAX_SYMLINK_HOPS = 40


class Node:
    """One inode of the merged tree; hard links are several directory entries holding the same Node."""

    __slots__ = (
        "children",
        "chunks",
        "devmajor",
        "devminor",
        "gid",
        "kind",
        "mode",
        "mtime",
        "mtime_nsec",
        "size",
        "target",
        "uid",
        "xattrs",
    )

    def __init__(self, kind: EntryKind, mode: int = 0o755) -> None:
        self.kind = kind
        self.mode = mode
        self.uid = 0
        self.gid = 0
        self.mtime = 0
        self.mtime_nsec = 0
        self.size = 0
        self.target = ""
        self.devmajor = 0
        self.devminor = 0
        self.xattrs: dict[str, bytes] = {}
        self.chunks: list[int] = []
        self.children: dict[str, Node] = {}

    @classmethod
    def from_entry(cls, entry: TarEntry, chunks: list[int] | None = None) -> Node:
        """Build a node from a (non-hard-link) tar entry and its chunk ids."""
        node = cls(entry.kind)
        node.set_metadata(entry)
        if entry.kind is EntryKind.REG:
            node.size = entry.size
            node.chunks = chunks or []
        elif entry.kind is EntryKind.SYMLINK:
            node.target = entry.link_target
            node.size = len(encode_name(entry.link_target))
        elif entry.kind in (EntryKind.CHR, EntryKind.BLK):
            node.devmajor, node.devminor = entry.devmajor, entry.devminor
        return node

    def set_metadata(self, entry: TarEntry) -> None:
        """Copy permissions, owner, mtime and xattrs from a tar entry."""
        self.mode = entry.mode
        self.uid = entry.uid
        self.gid = entry.gid
        self.mtime = entry.mtime
        self.mtime_nsec = entry.mtime_nsec
        self.xattrs = dict(entry.xattrs)

    @property
    def is_dir(self) -> bool:
        """True for directories."""
        return self.kind is EntryKind.DIR


@dataclass(slots=True)
class _Marker:
    """A whiteout or opaque marker; kept in tar order because it implies its parent directory exists."""

    parent: tuple[str, ...]
    name: str


class LayerDelta:
    """The changes one layer makes, collected while streaming it."""

    def __init__(self) -> None:
        self.records: list[tuple[TarEntry, list[int] | None] | _Marker] = []
        self.whiteouts: list[tuple[str, ...]] = []
        self.opaque_dirs: list[tuple[str, ...]] = []

    def add_entry(self, entry: TarEntry, chunks: list[int] | None = None) -> None:
        """Record a regular tar entry (with its chunk ids when it is a file)."""
        self.records.append((entry, chunks))

    def add_marker(self, entry: TarEntry) -> None:
        """Record a whiteout or opaque-directory marker entry."""
        parent, name = entry.path[:-1], entry.path[-1]
        if name == OPAQUE_MARKER:
            self.opaque_dirs.append(parent)
        else:
            self.whiteouts.append((*parent, name[len(WHITEOUT_PREFIX) :]))
        self.records.append(_Marker(parent, entry.name))


def classify(entry: TarEntry) -> str:
    """'entry', 'marker' (whiteout/opaque) or 'skip' (AUFS metadata) for a tar entry."""
    path = entry.path
    if not path:
        return "entry"
    for part in path[:-1]:
        if part.startswith(META_PREFIX):
            return "skip"
        if part.startswith(WHITEOUT_PREFIX):
            raise UnsupportedEntryError("a whiteout name is used as a directory")
    name = path[-1]
    if name == OPAQUE_MARKER:
        return "marker"
    if name.startswith(META_PREFIX):
        return "skip"
    if name.startswith(WHITEOUT_PREFIX):
        if name[len(WHITEOUT_PREFIX) :] in ("", ".", ".."):
            raise UnsafePathError("whiteout of an invalid name")
        return "marker"
    return "entry"


class MergedTree:
    """The merged file tree of all layers applied so far."""

    def __init__(self) -> None:
        self.root = Node(EntryKind.DIR, 0o755)

    def apply(self, delta: LayerDelta, layer: int | None = None) -> None:
        """Apply one layer: its deletions to the lower layers, then its entries in tar order."""
        for path in delta.opaque_dirs:
            node = self.find(path)
            if node is not None and node.is_dir:
                node.children.clear()
        for path in delta.whiteouts:
            parent = self.find(path[:-1])
            if parent is not None and parent.is_dir:
                parent.children.pop(path[-1], None)
        for record in delta.records:
            name = record.name if isinstance(record, _Marker) else record[0].name
            try:
                if isinstance(record, _Marker):
                    self.ensure_dirs(record.parent)
                else:
                    self._apply_entry(*record)
            except LayerError as exc:
                exc.layer = layer if exc.layer is None else exc.layer
                exc.entry = name if exc.entry is None else exc.entry
                raise

    def _apply_entry(self, entry: TarEntry, chunks: list[int] | None) -> None:
        if not entry.path:
            if entry.kind is not EntryKind.DIR:
                raise PathConflictError("the image root can only be a directory")
            self.root.set_metadata(entry)
            return
        parent = self.ensure_dirs(entry.path[:-1])
        name = entry.path[-1]
        existing = parent.children.get(name)
        if entry.kind is EntryKind.DIR:
            if existing is not None and existing.is_dir:
                existing.set_metadata(entry)
            else:
                parent.children[name] = Node.from_entry(entry)
        elif entry.kind is EntryKind.HARDLINK:
            target = self.find(entry.link_path)
            if target is None:
                raise HardLinkError(f"hard link target {entry.link_target!r} does not exist")
            if target.is_dir:
                raise HardLinkError(f"hard link target {entry.link_target!r} is a directory")
            parent.children[name] = target
        else:
            parent.children[name] = Node.from_entry(entry, chunks)

    def ensure_dirs(self, parts: tuple[str, ...]) -> Node:
        """Directory at ``parts``, creating missing ones; a non-directory on the way is an error."""
        node = self.root
        for i, name in enumerate(parts):
            child = node.children.get(name)
            if child is None:
                child = Node(EntryKind.DIR, 0o755)
                node.children[name] = child
            elif not child.is_dir:
                raise PathConflictError(f"parent {join_path(parts[: i + 1])} is a {child.kind.value}, not a directory")
            node = child
        return node

    def find(self, parts: tuple[str, ...]) -> Node | None:
        """Node at ``parts`` without following symlinks, or None."""
        node = self.root
        for name in parts:
            if not node.is_dir:
                return None
            child = node.children.get(name)
            if child is None:
                return None
            node = child
        return node

    def resolve(self, path: str) -> Node | None:
        """Node at an absolute image path, following symlinks inside the image root (chroot-style)."""
        todo = list(reversed(path.split("/")))
        stack = [self.root]
        hops = 0
        while todo:
            name = todo.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if len(stack) > 1:
                    stack.pop()
                continue
            node = stack[-1]
            if not node.is_dir:
                return None
            child = node.children.get(name)
            if child is None:
                return None
            if child.kind is EntryKind.SYMLINK:
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise SymlinkLoopError(f"too many symlinks resolving {path!r}")
                if child.target.startswith("/"):
                    del stack[1:]
                todo.extend(reversed(child.target.split("/")))
                continue
            stack.append(child)
        return stack[-1]

    def walk(self) -> Iterator[tuple[tuple[str, ...], Node]]:
        """Every (path, node) pair, depth first in name order; hard-linked nodes appear once per name."""
        stack: list[tuple[tuple[str, ...], Node]] = [((), self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.is_dir:
                for name in sorted(node.children, key=encode_name, reverse=True):
                    stack.append(((*path, name), node.children[name]))
