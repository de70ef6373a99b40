"""Normalisation of tar entry names into safe, root-relative path components.

Policy (documented in docs/format.md): a leading ``/`` is dropped (absolute names are taken relative to the
image root, as Docker does), empty and ``.`` components are dropped, and any ``..`` component is rejected
rather than resolved, because no legitimate layer needs it and resolving it lexically would silently move
entries.  Names must fit Linux limits (255-byte components, 4096-byte paths) and contain no NUL.
"""

from __future__ import annotations

from .errors import UnsafePathError

NAME_MAX = 255
PATH_MAX = 4096
#: Filesystem encoding of names: tar names that are not UTF-8 survive as surrogate escapes.
ENCODING = "utf-8"
ERRORS = "surrogateescape"


def encode_name(name: str) -> bytes:
    """Bytes of a name as stored in the bootstrap (UTF-8, surrogate escapes restored to raw bytes)."""
    return name.encode(ENCODING, ERRORS)


def decode_name(raw: bytes) -> str:
    """Inverse of :func:`encode_name`."""
    return raw.decode(ENCODING, ERRORS)


def split_path(name: str) -> tuple[str, ...]:
    """Split a tar entry name into safe components; ``()`` is the root. Raises UnsafePathError."""
    if "\x00" in name:
        raise UnsafePathError("entry name contains NUL", entry=name)
    if len(encode_name(name)) > PATH_MAX:
        raise UnsafePathError(f"entry name longer than {PATH_MAX} bytes", entry=name[:64] + "...")
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise UnsafePathError("entry name contains a '..' component", entry=name)
        if len(encode_name(part)) > NAME_MAX:
            raise UnsafePathError(f"path component longer than {NAME_MAX} bytes", entry=name)
        parts.append(part)
    return tuple(parts)


def join_path(parts: tuple[str, ...]) -> str:
    """Absolute image path (``/a/b``) of a component tuple."""
    return "/" + "/".join(parts)
