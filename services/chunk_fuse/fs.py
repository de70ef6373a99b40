"""The read-only FUSE filesystem of a lazy mount (mfusepy, libfuse3's high-level API).

Metadata comes from the bootstrap alone (no network): stat, readdir, readlink and xattrs are lookups in
memory.  The kernel is told everything is immutable: long entry and attribute timeouts and ``kernel_cache``
(pages survive close and re-open), and inode numbers are the bootstrap's (``use_ino``), so hard links show
one inode.  Reads go to the ChunkReader.  Anything that would write answers EROFS.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import mfusepy

from services.chunk_fuse.reader import ChunkReader, ReadError
from shared.image_format import Bootstrap, ImageFormatError, Inode

logger = logging.getLogger(__name__)

#: Seconds the kernel may keep entries and attributes: the image never changes under a mount.
CACHE_TIMEOUT = 86400.0
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT
_PATH_CACHE_SIZE = 65536


def _errno_of(exc: ImageFormatError) -> mfusepy.FuseOSError:
    return mfusepy.FuseOSError(exc.errno)


class ImageFS(mfusepy.Operations):  # type: ignore[misc]
    """A bootstrap's tree as a read-only filesystem; file contents through a ChunkReader."""

    use_ns = True

    def __init__(
        self,
        bootstrap: Bootstrap,
        reader: ChunkReader,
        *,
        enable_xattr: bool = True,
        on_init: Callable[[], None] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.reader = reader
        self.enable_xattr = enable_xattr
        self.on_init = on_init
        self._paths: OrderedDict[str, Inode] = OrderedDict()
        self._lock = threading.Lock()
        self._blocks = sum(-(-bootstrap.getattr(ino).size // 4096) for ino in range(1, bootstrap.inode_count + 1))

    # -- helpers ------------------------------------------------------------------------------------

    def _node(self, path: str) -> Inode:
        with self._lock:
            node = self._paths.get(path)
            if node is not None:
                self._paths.move_to_end(path)
                return node
        try:
            node = self.bootstrap.lookup(path)
        except ImageFormatError as exc:
            raise _errno_of(exc) from None
        with self._lock:
            self._paths[path] = node
            if len(self._paths) > _PATH_CACHE_SIZE:
                self._paths.popitem(last=False)
        return node

    @staticmethod
    def _stat(node: Inode) -> dict[str, Any]:
        mtime = node.mtime_ns
        return {
            "st_ino": node.ino,
            "st_mode": node.mode,
            "st_nlink": node.nlink,
            "st_uid": node.uid,
            "st_gid": node.gid,
            "st_size": node.size,
            "st_rdev": node.rdev,
            "st_blksize": 4096,
            "st_blocks": -(-node.size // 512),
            "st_atime": mtime,
            "st_mtime": mtime,
            "st_ctime": mtime,
        }

    # -- lifecycle ----------------------------------------------------------------------------------

    def init_with_config(self, conn_info: Any, config_3: Any) -> None:
        """Tell libfuse the tree is immutable, then report the mount ready."""
        if config_3 is not None:
            config_3.use_ino = 1
            config_3.readdir_ino = 1
            config_3.kernel_cache = 1
            config_3.entry_timeout = CACHE_TIMEOUT
            config_3.attr_timeout = CACHE_TIMEOUT
            config_3.negative_timeout = CACHE_TIMEOUT
            config_3.nullpath_ok = 1
        if self.on_init is not None:
            self.on_init()

    # -- metadata -----------------------------------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        """lstat."""
        if fh:
            return self._stat(self.bootstrap.getattr(fh))
        return self._stat(self._node(path))

    def readdir(self, path: str, fh: int) -> list[Any]:
        """Names with their types and inode numbers (plus ``.`` and ``..``)."""
        # With nullpath_ok libfuse passes no path here; opendir put the inode in the handle.
        node = self.bootstrap.getattr(fh) if fh else self._node(path)
        try:
            entries = self.bootstrap.readdir(node.ino)
        except ImageFormatError as exc:
            raise _errno_of(exc) from None
        out: list[Any] = [(".", {"st_mode": stat.S_IFDIR, "st_ino": node.ino}, 0)]
        out.append(("..", {"st_mode": stat.S_IFDIR, "st_ino": node.parent}, 0))
        out.extend((e.name, {"st_mode": e.type.value, "st_ino": e.ino}, 0) for e in entries)
        return out

    def readlink(self, path: str) -> str:
        """A symlink's target, verbatim."""
        try:
            return self.bootstrap.readlink(self._node(path).ino)
        except ImageFormatError as exc:
            raise _errno_of(exc) from None

    def listxattr(self, path: str) -> list[str]:
        """Extended attribute names (none when xattrs are disabled)."""
        if not self.enable_xattr:
            return []
        return self.bootstrap.listxattr(self._node(path).ino)

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        """One extended attribute's value; ENODATA when absent."""
        if not self.enable_xattr:
            raise mfusepy.FuseOSError(errno.ENODATA)
        try:
            return self.bootstrap.getxattr(self._node(path).ino, name)
        except ImageFormatError as exc:
            raise _errno_of(exc) from None

    def statfs(self, path: str) -> dict[str, int]:
        """A full, read-only filesystem of the image's size."""
        return {
            "f_bsize": 4096,
            "f_frsize": 4096,
            "f_blocks": self._blocks,
            "f_bfree": 0,
            "f_bavail": 0,
            "f_files": self.bootstrap.inode_count,
            "f_ffree": 0,
            "f_favail": 0,
            "f_namemax": 255,
        }

    def access(self, path: str, amode: int) -> int:
        """Writing is never allowed; the kernel checks the rest (default_permissions)."""
        if amode & os.W_OK:
            raise mfusepy.FuseOSError(errno.EROFS)
        self._node(path)
        return 0

    # -- files --------------------------------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        """The inode number becomes the file handle."""
        if flags & _WRITE_FLAGS:
            raise mfusepy.FuseOSError(errno.EROFS)
        node = self._node(path)
        if node.is_dir:
            raise mfusepy.FuseOSError(errno.EISDIR)
        return node.ino

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        """Bytes of the file, fetched as needed; EIO when a chunk cannot be had or fails its digest."""
        try:
            return self.reader.read(fh, offset, size)
        except ReadError as exc:
            logger.error("read of %s at %d (+%d) failed: %s", path, offset, size, exc.strerror)
            raise mfusepy.FuseOSError(exc.errno or errno.EIO) from None

    def release(self, path: str, fh: int) -> int:
        """Nothing to free per open file."""
        return 0

    def opendir(self, path: str) -> int:
        """The inode number becomes the directory handle."""
        node = self._node(path)
        if not node.is_dir:
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        return node.ino

    def releasedir(self, path: str, fh: int) -> int:
        """Nothing to free."""
        return 0
