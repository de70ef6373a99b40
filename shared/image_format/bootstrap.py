"""The bootstrap: a compact, versioned, checksummed binary image of the merged file tree.

The layout is described in docs/format.md.  In short: a 64-byte header and a section table, then fixed-size
little-endian record arrays (inodes, sorted per-directory dirent tables, chunk refs, unique chunks, blobs)
plus a string table, an xattr table and the prefetch list.  Records are decoded lazily with
``struct.unpack_from`` on the loaded bytes, so loading costs one read and one sha256 pass, and a path lookup
is a binary search per component.
"""

from __future__ import annotations

import enum
import hashlib
import os
import stat
import struct
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .chunker import FLAG_COMPRESSED, BlobRecord, StoredChunk
from .compression import Compressor
from .digest import Digester
from .errors import (
    BootstrapError,
    InvalidOptionError,
    NoSuchXattrError,
    NotARegularFileError,
    NotASymlinkError,
    NotDirectoryError,
    NotFoundError,
    SymlinkLoopError,
    UnsupportedVersionError,
)
from .paths import decode_name, encode_name
from .tar_merge import MAX_SYMLINK_HOPS, MergedTree, Node
from .tar_reader import EntryKind

MAGIC = b"DMSFBOOT"
VERSION_MAJOR = 1
VERSION_MINOR = 0
ROOT_INO = 1

HEADER = struct.Struct("<8sHHIBBHIQ32s")  # 64 bytes
SECTION = struct.Struct("<QQ")  # offset, length
INODE = struct.Struct("<IIIIQqIIIIIIII")  # 64 bytes
DIRENT = struct.Struct("<IHBxI")  # 12 bytes
CHUNK = struct.Struct("<IIQII32s")  # 56 bytes
BLOB = struct.Struct("<32sQQIB3x8x")  # 64 bytes
U32 = struct.Struct("<I")
XATTR = struct.Struct("<BI")  # name length, value length, then name and value bytes
_CHECKSUM_AT = 32  # byte offset of the sha256 field inside HEADER


class Section(enum.IntEnum):
    """Sections in the order of the section table."""

    INODES = 0
    DIRENTS = 1
    STRINGS = 2
    CHUNK_REFS = 3
    CHUNKS = 4
    BLOBS = 5
    XATTRS = 6
    PREFETCH = 7


_RECORD_SIZE = {
    Section.INODES: INODE.size,
    Section.DIRENTS: DIRENT.size,
    Section.CHUNK_REFS: 4,
    Section.CHUNKS: CHUNK.size,
    Section.BLOBS: BLOB.size,
    Section.PREFETCH: 4,
}


class FileType(enum.IntEnum):
    """Inode type; the value is the ``S_IFMT`` bits of ``st_mode``."""

    REG = stat.S_IFREG
    DIR = stat.S_IFDIR
    SYMLINK = stat.S_IFLNK
    CHR = stat.S_IFCHR
    BLK = stat.S_IFBLK
    FIFO = stat.S_IFIFO

    @property
    def dtype(self) -> int:
        """The ``d_type`` value readdir reports for this type."""
        return (self.value >> 12) & 0xF


_KIND_TO_TYPE = {
    EntryKind.REG: FileType.REG,
    EntryKind.DIR: FileType.DIR,
    EntryKind.SYMLINK: FileType.SYMLINK,
    EntryKind.CHR: FileType.CHR,
    EntryKind.BLK: FileType.BLK,
    EntryKind.FIFO: FileType.FIFO,
}
_DTYPE_TO_TYPE = {t.dtype: t for t in FileType}


@dataclass(frozen=True, slots=True)
class Inode:
    """Attributes of one inode, as ``getattr`` reports them."""

    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    mtime: int
    mtime_nsec: int
    rdev_major: int
    rdev_minor: int
    parent: int

    @property
    def type(self) -> FileType:
        """File type from the mode bits."""
        return FileType(stat.S_IFMT(self.mode))

    @property
    def permissions(self) -> int:
        """Permission bits including setuid/setgid/sticky."""
        return stat.S_IMODE(self.mode)

    @property
    def is_dir(self) -> bool:
        """True for directories."""
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        """True for regular files."""
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        """True for symlinks."""
        return stat.S_ISLNK(self.mode)

    @property
    def rdev(self) -> int:
        """Device number as ``os.makedev`` packs it (0 for non-devices)."""
        return os.makedev(self.rdev_major, self.rdev_minor)

    @property
    def mtime_ns(self) -> int:
        """Modification time in nanoseconds since the epoch."""
        return self.mtime * 1_000_000_000 + self.mtime_nsec


@dataclass(frozen=True, slots=True)
class DirEntry:
    """One readdir entry."""

    name: str
    ino: int
    type: FileType


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """One data blob referenced by the bootstrap."""

    index: int
    sha256: str
    compressed_size: int
    uncompressed_size: int
    chunk_count: int
    compressor: Compressor

    @property
    def digest(self) -> str:
        """OCI digest string (``sha256:<hex>``)."""
        return "sha256:" + self.sha256


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """One unique chunk: where its bytes are in which blob, and how to check them."""

    index: int
    blob_index: int
    blob_sha256: str
    compressed_offset: int
    compressed_size: int
    uncompressed_size: int
    digest: bytes
    compressed: bool
    compressor: Compressor
    digester: Digester

    @property
    def compressed_end(self) -> int:
        """Offset just past the chunk's bytes in its blob."""
        return self.compressed_offset + self.compressed_size

    @property
    def digest_str(self) -> str:
        """``algo:hex`` form of the digest."""
        return self.digester.format_digest(self.digest)


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """A chunk as used by one file: its position in the file, and the chunk itself."""

    file_index: int
    file_offset: int
    chunk: ChunkInfo

    @property
    def file_end(self) -> int:
        """File offset just past this chunk."""
        return self.file_offset + self.chunk.uncompressed_size


# --------------------------------------------------------------------------------------------------
# Writing


def _align(buf: bytearray) -> None:
    buf.extend(b"\x00" * (-len(buf) % 8))


def write_bootstrap(
    tree: MergedTree,
    chunks: Sequence[StoredChunk],
    blobs: Sequence[BlobRecord],
    *,
    digester: Digester,
    chunk_size: int,
    prefetch: Sequence[str] = (),
) -> tuple[bytes, list[str]]:
    """Serialise a merged tree whose file nodes hold chunk-table indices.

    Returns (bootstrap bytes, prefetch paths that were not found in the tree).
    """
    if chunk_size <= 0 or chunk_size & (chunk_size - 1):
        raise InvalidOptionError(f"chunk size {chunk_size} is not a power of two")

    # Inode numbers in breadth-first order of name-sorted directories: siblings get consecutive numbers
    # and a directory's dirent table is one contiguous, binary-searchable run.
    nodes: list[Node] = [tree.root]
    parents: list[int] = [ROOT_INO]
    ino_of: dict[int, int] = {id(tree.root): ROOT_INO}
    dir_entries: list[tuple[int, list[tuple[bytes, Node]]]] = []
    queue: deque[Node] = deque([tree.root])
    while queue:
        directory = queue.popleft()
        dir_ino = ino_of[id(directory)]
        kids = sorted(((encode_name(n), c) for n, c in directory.children.items()), key=lambda kv: kv[0])
        dir_entries.append((dir_ino, kids))
        for _, child in kids:
            if id(child) not in ino_of:
                ino_of[id(child)] = len(nodes) + 1
                nodes.append(child)
                parents.append(dir_ino)
                if child.is_dir:
                    queue.append(child)

    strings = bytearray()
    string_at: dict[bytes, int] = {}

    def intern(raw: bytes) -> int:
        off = string_at.get(raw)
        if off is None:
            off = string_at[raw] = len(strings)
            strings.extend(raw)
        return off

    nlink = [0] * len(nodes)
    nlink[0] = 2  # the root's "." and its own ".."
    dir_range: dict[int, tuple[int, int]] = {}
    dirents = bytearray()
    count = 0
    for dir_ino, kids in dir_entries:
        dir_range[dir_ino] = (count, len(kids))
        for raw, child in kids:
            ino = ino_of[id(child)]
            if child.is_dir:
                nlink[ino - 1] += 2  # its name here and its own "."
                nlink[dir_ino - 1] += 1  # its ".." entry
            else:
                nlink[ino - 1] += 1
            dirents += DIRENT.pack(intern(raw), len(raw), _KIND_TO_TYPE[child.kind].dtype, ino)
        count += len(kids)

    xattrs = bytearray()
    xattr_at: dict[bytes, int] = {}
    chunk_refs = bytearray()
    ref_count = 0
    inodes = bytearray()
    for i, node in enumerate(nodes):
        ino = i + 1
        data_a = data_b = 0
        if node.is_dir:
            data_a, data_b = dir_range[ino]
        elif node.kind is EntryKind.REG:
            ids = node.chunks
            if len(ids) != -(-node.size // chunk_size):
                raise BootstrapError(f"inode {ino}: {len(ids)} chunks for {node.size} bytes")
            data_a, data_b = ref_count, len(ids)
            chunk_refs += struct.pack(f"<{len(ids)}I", *ids)
            ref_count += len(ids)
        elif node.kind is EntryKind.SYMLINK:
            raw_target = encode_name(node.target)
            data_a, data_b = intern(raw_target), len(raw_target)
        xattr_off = xattr_len = 0
        if node.xattrs:
            blob = bytearray()
            for name in sorted(node.xattrs, key=encode_name):
                raw_name, value = encode_name(name), node.xattrs[name]
                blob += XATTR.pack(len(raw_name), len(value)) + raw_name + value
            key = bytes(blob)
            if key not in xattr_at:
                xattr_at[key] = len(xattrs)
                xattrs += key
            xattr_off, xattr_len = xattr_at[key], len(key)
        mode = _KIND_TO_TYPE[node.kind].value | node.mode
        inodes += INODE.pack(
            mode,
            node.uid,
            node.gid,
            nlink[i],
            node.size,
            node.mtime,
            node.mtime_nsec,
            node.devmajor,
            node.devminor,
            data_a,
            data_b,
            xattr_off,
            xattr_len,
            parents[i],
        )

    chunk_table = bytearray()
    for c in chunks:
        chunk_table += CHUNK.pack(
            c.blob_index, c.flags, c.compressed_offset, c.compressed_size, c.uncompressed_size, c.digest
        )
    blob_table = bytearray()
    for b in blobs:
        blob_table += BLOB.pack(
            bytes.fromhex(b.sha256), b.compressed_size, b.uncompressed_size, b.chunk_count, b.compressor.code
        )

    missing: list[str] = []
    prefetch_inos: list[int] = []
    for path in prefetch:
        try:
            node_or_none = tree.resolve(path)
        except SymlinkLoopError:
            node_or_none = None
        if node_or_none is None:
            missing.append(path)
            continue
        ino = ino_of[id(node_or_none)]
        if ino not in prefetch_inos:
            prefetch_inos.append(ino)
    prefetch_table = struct.pack(f"<{len(prefetch_inos)}I", *prefetch_inos)

    sections: list[bytes | bytearray] = [
        inodes,
        dirents,
        strings,
        chunk_refs,
        chunk_table,
        blob_table,
        xattrs,
        prefetch_table,
    ]
    header_size = HEADER.size + SECTION.size * len(sections)
    out = bytearray(header_size)
    _align(out)
    table = bytearray()
    for body in sections:
        table += SECTION.pack(len(out), len(body))
        out += body
        _align(out)
    out[HEADER.size : header_size] = table
    HEADER.pack_into(
        out,
        0,
        MAGIC,
        VERSION_MAJOR,
        VERSION_MINOR,
        header_size,
        digester.code,
        chunk_size.bit_length() - 1,
        0,
        len(sections),
        len(out),
        b"\x00" * 32,
    )
    checksum = hashlib.sha256(out).digest()
    out[_CHECKSUM_AT : _CHECKSUM_AT + 32] = checksum
    return bytes(out), missing


# --------------------------------------------------------------------------------------------------
# Reading


class Bootstrap:
    """A loaded bootstrap: lookups and attribute queries decode records on demand."""

    def __init__(self, data: bytes, *, verify: bool = True) -> None:
        if len(data) < HEADER.size:
            raise BootstrapError("bootstrap is shorter than its header")
        magic, major, minor, header_size, dig, cs_log2, _flags, nsect, size, checksum = HEADER.unpack_from(data, 0)
        if magic != MAGIC:
            raise BootstrapError("not a Damselfly bootstrap (bad magic)")
        if major != VERSION_MAJOR:
            raise UnsupportedVersionError(f"bootstrap format {major}.{minor}; this reader supports {VERSION_MAJOR}.x")
        if size != len(data):
            raise BootstrapError(f"bootstrap is {len(data)} bytes, header says {size}")
        if verify:
            h = hashlib.sha256()
            view = memoryview(data)
            h.update(view[:_CHECKSUM_AT])
            h.update(b"\x00" * 32)
            h.update(view[_CHECKSUM_AT + 32 :])
            if h.digest() != checksum:
                raise BootstrapError("bootstrap checksum mismatch")
        if nsect < len(Section) or header_size != HEADER.size + nsect * SECTION.size:
            raise BootstrapError("bootstrap section table is malformed")
        self._data = data
        self.version = (major, minor)
        self.checksum = checksum.hex()
        self.digester = Digester.from_code(dig)
        if not 12 <= cs_log2 <= 24:
            raise BootstrapError(f"chunk size 2**{cs_log2} out of range")
        self.chunk_size = 1 << cs_log2
        self._off: list[int] = []
        self._len: list[int] = []
        # Newer minor versions may append sections; this reader only knows the first len(Section).
        for sect in Section:
            off, length = SECTION.unpack_from(data, HEADER.size + sect * SECTION.size)
            if off < header_size or off + length > size:
                raise BootstrapError(f"section {sect.name} lies outside the bootstrap")
            record = _RECORD_SIZE.get(sect)
            if record and length % record:
                raise BootstrapError(f"section {sect.name} length is not a multiple of {record}")
            self._off.append(off)
            self._len.append(length)
        self.inode_count = self._len[Section.INODES] // INODE.size
        self.dirent_count = self._len[Section.DIRENTS] // DIRENT.size
        self.chunk_count = self._len[Section.CHUNKS] // CHUNK.size
        self.chunk_ref_count = self._len[Section.CHUNK_REFS] // 4
        if self.inode_count < 1:
            raise BootstrapError("bootstrap has no root inode")
        self._ioff = self._off[Section.INODES]
        self._doff = self._off[Section.DIRENTS]
        self._soff = self._off[Section.STRINGS]
        self._roff = self._off[Section.CHUNK_REFS]
        self._coff = self._off[Section.CHUNKS]
        self._xoff = self._off[Section.XATTRS]
        self.blobs = [
            BlobInfo(i, sha.hex(), csize, usize, nchunks, Compressor.from_code(code))
            for i, (sha, csize, usize, nchunks, code) in enumerate(
                BLOB.iter_unpack(data[self._off[Section.BLOBS] : self._off[Section.BLOBS] + self._len[Section.BLOBS]])
            )
        ]
        if not self.getattr(ROOT_INO).is_dir:
            raise BootstrapError("root inode is not a directory")

    @classmethod
    def load(cls, source: bytes | bytearray | memoryview | str | os.PathLike[str], *, verify: bool = True) -> Bootstrap:
        """Load a bootstrap from bytes or a file path; ``verify`` checks the whole-file sha256."""
        if isinstance(source, bytes):
            data = source
        elif isinstance(source, bytearray | memoryview):
            data = bytes(source)
        else:
            data = Path(source).read_bytes()
        return cls(data, verify=verify)

    @property
    def size(self) -> int:
        """Size of the bootstrap in bytes."""
        return len(self._data)

    @property
    def root(self) -> Inode:
        """The root directory inode."""
        return self.getattr(ROOT_INO)

    # -- inodes ---------------------------------------------------------------------------------------

    def _record(self, ino: int) -> tuple[int, ...]:
        if not 1 <= ino <= self.inode_count:
            raise NotFoundError(f"no inode {ino}")
        return INODE.unpack_from(self._data, self._ioff + (ino - 1) * INODE.size)

    def getattr(self, inode: int | Inode) -> Inode:
        """Attributes of an inode (an ``Inode`` argument is re-read, so stale copies are refreshed)."""
        ino = inode.ino if isinstance(inode, Inode) else inode
        mode, uid, gid, nlink, size, mtime, mnsec, major, minor, _a, _b, _xo, _xl, parent = self._record(ino)
        return Inode(ino, mode, uid, gid, nlink, size, mtime, mnsec, major, minor, parent)

    def _string(self, off: int, length: int) -> bytes:
        start = self._soff + off
        if off + length > self._len[Section.STRINGS]:
            raise BootstrapError("string reference outside the string table")
        return self._data[start : start + length]

    # -- directories ----------------------------------------------------------------------------------

    def _dir_range(self, ino: int) -> tuple[int, int]:
        rec = self._record(ino)
        if not stat.S_ISDIR(rec[0]):
            raise NotDirectoryError(f"inode {ino} is not a directory")
        first, count = rec[9], rec[10]
        if first + count > self.dirent_count:
            raise BootstrapError(f"inode {ino}: dirent range outside the table")
        return first, count

    def lookup_child(self, parent: int | Inode, name: str) -> Inode:
        """Entry ``name`` of directory ``parent`` (binary search over its sorted dirent table)."""
        pino = parent.ino if isinstance(parent, Inode) else parent
        first, count = self._dir_range(pino)
        raw = encode_name(name)
        data, doff, soff = self._data, self._doff, self._soff
        lo, hi = first, first + count
        while lo < hi:
            mid = (lo + hi) // 2
            noff, nlen, _dtype, ino = DIRENT.unpack_from(data, doff + mid * DIRENT.size)
            probe = data[soff + noff : soff + noff + nlen]
            if probe < raw:
                lo = mid + 1
            elif probe > raw:
                hi = mid
            else:
                return self.getattr(ino)
        raise NotFoundError(f"no entry {name!r} in directory inode {pino}")

    def lookup(self, path: str, *, follow_symlinks: bool = False) -> Inode:
        """Inode at an absolute image path; intermediate symlinks resolve inside the image (chroot-style).

        The last component is followed only with ``follow_symlinks`` (``stat`` vs ``lstat``).  Symlinks
        are interpreted against the image root, never against the host filesystem.
        """
        todo = list(reversed(path.split("/")))
        stack = [self.getattr(ROOT_INO)]
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
                raise NotDirectoryError(f"{path!r}: a component is not a directory")
            child = self.lookup_child(node.ino, name)
            # Anything left in the path (even a trailing "/") means the link is a directory step: follow.
            if child.is_symlink and (follow_symlinks or todo):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise SymlinkLoopError(f"too many symlinks resolving {path!r}")
                target = self.readlink(child.ino)
                if target.startswith("/"):
                    del stack[1:]
                todo.extend(reversed(target.split("/")))
                continue
            stack.append(child)
        if path.endswith("/") and not stack[-1].is_dir:
            raise NotDirectoryError(f"{path!r}: not a directory")
        return stack[-1]

    def readdir(self, inode: int | Inode) -> list[DirEntry]:
        """Entries of a directory in name (byte) order, without ``.`` and ``..``."""
        ino = inode.ino if isinstance(inode, Inode) else inode
        first, count = self._dir_range(ino)
        start = self._doff + first * DIRENT.size
        out = []
        for noff, nlen, dtype, child in DIRENT.iter_unpack(self._data[start : start + count * DIRENT.size]):
            out.append(DirEntry(decode_name(self._string(noff, nlen)), child, _DTYPE_TO_TYPE[dtype]))
        return out

    # -- symlinks and xattrs --------------------------------------------------------------------------

    def readlink_bytes(self, inode: int | Inode) -> bytes:
        """Raw target bytes of a symlink."""
        ino = inode.ino if isinstance(inode, Inode) else inode
        rec = self._record(ino)
        if not stat.S_ISLNK(rec[0]):
            raise NotASymlinkError(f"inode {ino} is not a symlink")
        return self._string(rec[9], rec[10])

    def readlink(self, inode: int | Inode) -> str:
        """Target of a symlink, as stored (never resolved against the host)."""
        return decode_name(self.readlink_bytes(inode))

    def xattrs(self, inode: int | Inode) -> dict[str, bytes]:
        """All extended attributes of an inode, in name order."""
        ino = inode.ino if isinstance(inode, Inode) else inode
        rec = self._record(ino)
        off, length = rec[11], rec[12]
        if not length:
            return {}
        if off + length > self._len[Section.XATTRS]:
            raise BootstrapError(f"inode {ino}: xattrs outside the xattr table")
        data = self._data
        pos, end = self._xoff + off, self._xoff + off + length
        out: dict[str, bytes] = {}
        while pos < end:
            nlen, vlen = XATTR.unpack_from(data, pos)
            pos += XATTR.size
            name = decode_name(data[pos : pos + nlen])
            out[name] = data[pos + nlen : pos + nlen + vlen]
            pos += nlen + vlen
        if pos != end:
            raise BootstrapError(f"inode {ino}: malformed xattr record")
        return out

    def listxattr(self, inode: int | Inode) -> list[str]:
        """Names of an inode's extended attributes."""
        return list(self.xattrs(inode))

    def getxattr(self, inode: int | Inode, name: str) -> bytes:
        """Value of one extended attribute; raises NoSuchXattrError (ENODATA) when absent."""
        try:
            return self.xattrs(inode)[name]
        except KeyError:
            raise NoSuchXattrError(f"no xattr {name!r}") from None

    # -- chunks ---------------------------------------------------------------------------------------

    def chunk(self, index: int) -> ChunkInfo:
        """One unique chunk by its index in the chunk table."""
        if not 0 <= index < self.chunk_count:
            raise NotFoundError(f"no chunk {index}")
        blob_index, flags, coff, csize, usize, digest = CHUNK.unpack_from(self._data, self._coff + index * CHUNK.size)
        if blob_index >= len(self.blobs):
            raise BootstrapError(f"chunk {index} names blob {blob_index}, which does not exist")
        blob = self.blobs[blob_index]
        return ChunkInfo(
            index,
            blob_index,
            blob.sha256,
            coff,
            csize,
            usize,
            digest,
            bool(flags & FLAG_COMPRESSED),
            blob.compressor,
            self.digester,
        )

    def _file_chunks(self, ino: int) -> tuple[int, int, int]:
        rec = self._record(ino)
        if not stat.S_ISREG(rec[0]):
            raise NotARegularFileError(f"inode {ino} is not a regular file")
        first, count = rec[9], rec[10]
        if first + count > self.chunk_ref_count:
            raise BootstrapError(f"inode {ino}: chunk refs outside the table")
        return rec[4], first, count

    def chunks_for_range(self, inode: int | Inode, offset: int, size: int) -> list[ChunkRef]:
        """Chunks covering bytes ``[offset, offset+size)`` of a file, clipped to the file's size."""
        ino = inode.ino if isinstance(inode, Inode) else inode
        if offset < 0 or size < 0:
            raise InvalidOptionError("offset and size must not be negative")
        file_size, first, count = self._file_chunks(ino)
        end = min(offset + size, file_size)
        if offset >= end:
            return []
        cs = self.chunk_size
        lo, hi = offset // cs, (end - 1) // cs
        return [self._ref(first, i) for i in range(lo, min(hi + 1, count))]

    def file_chunks(self, inode: int | Inode) -> list[ChunkRef]:
        """All chunks of a regular file, in file order."""
        ino = inode.ino if isinstance(inode, Inode) else inode
        _size, first, count = self._file_chunks(ino)
        return [self._ref(first, i) for i in range(count)]

    def _ref(self, first: int, i: int) -> ChunkRef:
        (index,) = U32.unpack_from(self._data, self._roff + (first + i) * 4)
        return ChunkRef(i, i * self.chunk_size, self.chunk(index))

    # -- prefetch and traversal -----------------------------------------------------------------------

    def prefetch_inodes(self) -> list[int]:
        """Inodes listed in the prefetch table, in the order given at conversion."""
        off, length = self._off[Section.PREFETCH], self._len[Section.PREFETCH]
        return [ino for (ino,) in U32.iter_unpack(self._data[off : off + length])]

    def prefetch_files(self) -> list[int]:
        """Regular-file inodes to fetch first: prefetch entries with directories expanded recursively."""
        seen: set[int] = set()
        out: list[int] = []
        for ino in self.prefetch_inodes():
            for _path, node in self.walk(ino):
                if node.is_reg and node.ino not in seen:
                    seen.add(node.ino)
                    out.append(node.ino)
        return out

    def walk(self, inode: int | Inode = ROOT_INO, path: str = "/") -> Iterator[tuple[str, Inode]]:
        """(path, inode) for ``inode`` (named ``path``) and everything below it, depth first in name order."""
        stack: list[tuple[str, Inode]] = [(path, self.getattr(inode))]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.is_dir:
                base = "" if path == "/" else path
                for entry in reversed(self.readdir(node.ino)):
                    stack.append((f"{base}/{entry.name}", self.getattr(entry.ino)))

    def validate(self) -> None:
        """Check every record's references and the sort order of every directory (slow: O(size))."""
        seen_files = 0
        for ino in range(1, self.inode_count + 1):
            node = self.getattr(ino)
            try:
                node.type  # noqa: B018 - raises ValueError for an unknown S_IFMT
            except ValueError:
                raise BootstrapError(f"inode {ino} has an unknown file type") from None
            if not 1 <= node.parent <= self.inode_count:
                raise BootstrapError(f"inode {ino} has parent {node.parent} out of range")
            if node.is_dir:
                names = []
                for entry in self.readdir(ino):
                    if not 1 <= entry.ino <= self.inode_count or entry.ino == ROOT_INO:
                        raise BootstrapError(f"directory {ino}: entry {entry.name!r} has a bad inode")
                    if entry.type is not self.getattr(entry.ino).type:
                        raise BootstrapError(f"directory {ino}: entry {entry.name!r} has a wrong type")
                    names.append(encode_name(entry.name))
                if names != sorted(set(names)):
                    raise BootstrapError(f"directory {ino}: entries are not sorted and unique")
            elif node.is_reg:
                seen_files += 1
                refs = self.file_chunks(ino)
                if len(refs) != -(-node.size // self.chunk_size):
                    raise BootstrapError(f"inode {ino}: chunk count does not match its size")
                for ref in refs:
                    want = min(self.chunk_size, node.size - ref.file_offset)
                    if ref.chunk.uncompressed_size != want:
                        raise BootstrapError(f"inode {ino}: chunk {ref.file_index} has the wrong size")
            elif node.is_symlink:
                self.readlink_bytes(ino)
            self.xattrs(ino)
        for index in range(self.chunk_count):
            c = self.chunk(index)
            if c.compressed_end > self.blobs[c.blob_index].compressed_size:
                raise BootstrapError(f"chunk {index} lies outside its blob")
        for ino in self.prefetch_inodes():
            self.getattr(ino)
