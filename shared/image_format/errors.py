"""Error classes raised by the lazy image format library.

Every error derives from :class:`ImageFormatError`, so callers (the CLI, the FUSE daemon) can catch one
class.  Lookup errors carry an ``errno`` so a filesystem front end can answer the kernel directly.
"""

from __future__ import annotations

import errno as _errno


class ImageFormatError(Exception):
    """Base class of every error raised by ``shared.image_format``."""

    errno: int = _errno.EIO


class InvalidOptionError(ImageFormatError, ValueError):
    """A conversion option or an API argument is out of range."""

    errno = _errno.EINVAL


class LayerError(ImageFormatError):
    """A source layer cannot be converted; names the layer and tar entry when known."""

    def __init__(self, message: str, *, layer: int | None = None, entry: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.layer = layer
        self.entry = entry

    def __str__(self) -> str:
        where = []
        if self.layer is not None:
            where.append(f"layer {self.layer}")
        if self.entry is not None:
            where.append(f"entry {self.entry!r}")
        return f"{self.message} ({', '.join(where)})" if where else self.message


class UnsupportedCompressionError(LayerError):
    """The layer is compressed with something other than gzip, zstd or nothing."""


class CorruptLayerError(LayerError):
    """The layer is not a valid (compressed) tar stream."""


class TruncatedLayerError(CorruptLayerError):
    """The layer ends before its compressed stream or its tar archive is complete."""


class HeaderTooLargeError(LayerError):
    """A PAX or GNU long-name header exceeds the configured limit."""


class UnsafePathError(LayerError):
    """A tar entry name is unusable: it climbs out of the root with ``..``, is too long, or has NUL."""


class PathConflictError(LayerError):
    """An entry needs a parent directory where the tree holds a non-directory (file, symlink, ...)."""


class HardLinkError(LayerError):
    """A hard link points outside the root, at nothing, or at a directory."""


class UnsupportedEntryError(LayerError):
    """A tar entry has a type or a numeric field this format cannot represent."""


class BootstrapError(ImageFormatError):
    """A bootstrap is corrupt, truncated or fails its checksum."""


class UnsupportedVersionError(BootstrapError):
    """A bootstrap was written by an incompatible (newer major) version of the format."""


class NotFoundError(ImageFormatError, LookupError):
    """No such path, inode, chunk or blob in the bootstrap."""

    errno = _errno.ENOENT


class NotDirectoryError(ImageFormatError):
    """A path component or a readdir target is not a directory."""

    errno = _errno.ENOTDIR


class NotASymlinkError(ImageFormatError):
    """``readlink`` was called on something that is not a symlink."""

    errno = _errno.EINVAL


class NotARegularFileError(ImageFormatError):
    """A content operation was called on something that is not a regular file."""

    errno = _errno.EISDIR


class NoSuchXattrError(ImageFormatError, LookupError):
    """The inode has no extended attribute of that name."""

    errno = _errno.ENODATA


class SymlinkLoopError(ImageFormatError):
    """Resolving a path followed too many symlinks."""

    errno = _errno.ELOOP


class CorruptChunkError(ImageFormatError):
    """Chunk bytes fetched from a blob cannot be decompressed to the recorded size."""


class DigestMismatchError(CorruptChunkError):
    """Decompressed chunk bytes do not match the digest recorded in the bootstrap."""

    def __init__(self, chunk_index: int, expected: str, actual: str) -> None:
        super().__init__(f"chunk {chunk_index}: digest mismatch, expected {expected}, got {actual}")
        self.chunk_index = chunk_index
        self.expected = expected
        self.actual = actual


#: Short alias named after the issue's wording.
DigestMismatch = DigestMismatchError
