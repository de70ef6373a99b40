"""Streaming reader of one OCI layer: detects compression, decompresses, parses tar headers.

Nothing is ever unpacked to disk: entries come out as :class:`TarEntry` metadata records and regular-file
contents are read chunk by chunk from the stream.  The reader enforces the hostile-input rules that belong
to the tar level (header size limits, truncation, corrupt headers, out-of-range numeric fields); tree
rules (whiteouts, links, parents) live in :mod:`.tar_merge`.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import io
import os
import tarfile
import types
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import IO, Any, BinaryIO, ClassVar, cast
from urllib.parse import unquote_to_bytes

import zstandard

from .errors import (
    CorruptLayerError,
    HardLinkError,
    HeaderTooLargeError,
    ImageFormatError,
    LayerError,
    TruncatedLayerError,
    UnsafePathError,
    UnsupportedCompressionError,
    UnsupportedEntryError,
)
from .paths import ENCODING, ERRORS, PATH_MAX, encode_name, split_path

_zlib_impl: types.ModuleType
try:  # ISA-L inflates gzip ~2.3x faster than zlib here; gzip decompression bounds conversion speed.
    from isal import isal_zlib

    _zlib_impl = isal_zlib
except ImportError:  # pragma: no cover - isal is a declared dependency, zlib is the safety net
    _zlib_impl = zlib
_ZLIB_ERRORS: tuple[type[Exception], ...] = (zlib.error, getattr(_zlib_impl, "error", zlib.error))

# tarfile's header exception classes are not in typeshed (they are undocumented but stable since 3.2).
_EOFHeaderError: type[Exception] = tarfile.EOFHeaderError  # type: ignore[attr-defined]
_TruncatedHeaderError: type[Exception] = tarfile.TruncatedHeaderError  # type: ignore[attr-defined]
_EmptyHeaderError: type[Exception] = tarfile.EmptyHeaderError  # type: ignore[attr-defined]
_InvalidHeaderError: type[Exception] = tarfile.InvalidHeaderError  # type: ignore[attr-defined]

#: A layer given as a path, raw bytes, or an open binary stream (read from its current position).
LayerInput = str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes]

DEFAULT_MAX_HEADER_SIZE = 1 << 20
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
_U32 = (1 << 32) - 1
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
_READ_SIZE = 1 << 20
# tarfile's stream buffer: small enough that each 512-byte header read (which copies the leftover buffer)
# stays cheap, large enough that a 1 MiB content read takes few loop turns.  Measured: 32 KiB is best.
_TAR_BUFSIZE = 32 << 10
_HEADER_TYPES = frozenset(
    {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK}
)


class LayerCompression(enum.StrEnum):
    """Compression of a source layer, detected from its magic bytes."""

    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


class EntryKind(enum.Enum):
    """Kind of a tar entry after mapping tar type flags."""

    REG = "reg"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHR = "chr"
    BLK = "blk"
    FIFO = "fifo"


_KINDS = {
    tarfile.REGTYPE: EntryKind.REG,
    tarfile.AREGTYPE: EntryKind.REG,
    tarfile.CONTTYPE: EntryKind.REG,
    tarfile.GNUTYPE_SPARSE: EntryKind.REG,
    tarfile.DIRTYPE: EntryKind.DIR,
    tarfile.SYMTYPE: EntryKind.SYMLINK,
    tarfile.LNKTYPE: EntryKind.HARDLINK,
    tarfile.CHRTYPE: EntryKind.CHR,
    tarfile.BLKTYPE: EntryKind.BLK,
    tarfile.FIFOTYPE: EntryKind.FIFO,
}


@dataclass(slots=True)
class TarEntry:
    """Metadata of one tar entry, with its name already split into safe components."""

    name: str
    path: tuple[str, ...]
    kind: EntryKind
    mode: int
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int
    size: int
    link_target: str = ""
    link_path: tuple[str, ...] = ()
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    sparse: bool = False


@dataclass(slots=True)
class LayerDigests:
    """What the reader learnt about a layer's bytes while streaming it."""

    compression: LayerCompression
    compressed_size: int
    compressed_sha256: str
    tar_size: int
    diff_id: str


def parse_mtime(pax_value: str | None, fallback: float) -> tuple[int, int]:
    """(seconds, nanoseconds) of an mtime; PAX decimal strings are parsed exactly, not via float."""
    if pax_value is not None:
        try:
            value = Decimal(pax_value)
        except InvalidOperation:
            raise UnsupportedEntryError(f"invalid PAX mtime {pax_value!r}") from None
        # Bound the magnitude before any int conversion: "1e999999999" would otherwise build a huge integer.
        if not value.is_finite() or not _I64_MIN <= value <= _I64_MAX:
            raise UnsupportedEntryError(f"invalid or out-of-range PAX mtime {pax_value[:40]!r}")
        seconds = int(value.to_integral_value(rounding="ROUND_FLOOR"))
        nsec = int((value - seconds) * 1_000_000_000)
    else:
        seconds = int(fallback)
        nsec = 0
    if not _I64_MIN <= seconds <= _I64_MAX:
        raise UnsupportedEntryError(f"mtime {seconds} out of range")
    return seconds, nsec


def parse_xattrs(pax_headers: Mapping[str, str]) -> dict[str, bytes]:
    """Extended attributes from PAX ``SCHILY.xattr.*`` (and libarchive's base64 form) records."""
    xattrs: dict[str, bytes] = {}
    for key, value in pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr.") :]
            # tarfile decoded the raw value with surrogateescape, so this restores the exact bytes.
            xattrs[name] = value.encode(ENCODING, ERRORS)
    for key, value in pax_headers.items():
        if key.startswith("LIBARCHIVE.xattr."):
            name = unquote_to_bytes(key[len("LIBARCHIVE.xattr.") :]).decode(ENCODING, ERRORS)
            if name not in xattrs:
                try:
                    xattrs[name] = base64.b64decode(value.encode("ascii"), validate=True)
                except ValueError:
                    raise UnsupportedEntryError(f"invalid base64 in xattr {name!r}") from None
    for name, data in xattrs.items():
        raw = encode_name(name)
        if not raw or len(raw) > XATTR_NAME_MAX or b"\x00" in raw:
            raise UnsupportedEntryError(f"invalid xattr name {name!r}")
        if len(data) > XATTR_SIZE_MAX:
            raise UnsupportedEntryError(f"xattr {name!r} value larger than {XATTR_SIZE_MAX} bytes")
    return xattrs


class _OffThreadSha256:
    """sha256 fed on a helper thread: hashlib releases the GIL, so the main thread keeps parsing meanwhile."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._hash = hashlib.sha256()
        self._pool = pool
        self._pending: deque[Future[None]] = deque()

    def update(self, data: bytes) -> None:
        """Queue ``data``; the single helper thread hashes pieces in submission order."""
        self._pending.append(self._pool.submit(self._hash.update, data))
        while len(self._pending) > 8:  # bounds memory held by queued pieces
            self._pending.popleft().result()

    def hexdigest(self) -> str:
        """Digest of everything queued so far."""
        while self._pending:
            self._pending.popleft().result()
        return self._hash.hexdigest()


class _DecompressingStream:
    """File-like ``read(n)`` over a layer's decompressed bytes; hashes both sides as it goes."""

    def __init__(self, raw: IO[bytes], layer: int) -> None:
        self._raw = raw
        self._layer = layer
        # One helper thread for both digests: each is fed in order, and ~0.2 s of sha256 per 170 MB
        # image moves off the thread that parses tar headers.
        self._hash_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-sha256")
        self._compressed_hash = _OffThreadSha256(self._hash_pool)
        self._tar_hash = _OffThreadSha256(self._hash_pool)
        self.compressed_size = 0
        self.tar_size = 0
        try:
            first = self._read_raw()
            while 0 < len(first) < 8:  # a short first read from a pipe must not hide the magic bytes
                more = self._read_raw()
                if not more:
                    break
                first += more
            self.compression = _detect(first, layer)
        except BaseException:
            self.close()
            raise
        self._pieces = self._generate(first)
        self._pending = b""
        self._pending_pos = 0

    def _read_raw(self) -> bytes:
        data = self._raw.read(_READ_SIZE)
        if data:
            self._compressed_hash.update(data)
            self.compressed_size += len(data)
        return data

    def _generate(self, first: bytes) -> Iterator[bytes]:
        if self.compression is LayerCompression.GZIP:
            return self._gzip(first)
        if self.compression is LayerCompression.ZSTD:
            return self._zstd(first)
        return self._plain(first)

    def _plain(self, first: bytes) -> Iterator[bytes]:
        data = first
        while data:
            yield data
            data = self._read_raw()

    def _gzip(self, first: bytes) -> Iterator[bytes]:
        pending = first
        members = 0
        while True:
            # At a member boundary: another gzip member, zero padding, or the end.
            if not pending:
                pending = self._read_raw()
                if not pending:
                    return
            if members and pending[:1] == b"\x00":
                while pending:
                    if pending.count(0) != len(pending):
                        raise CorruptLayerError("garbage after the gzip stream", layer=self._layer)
                    pending = self._read_raw()
                return
            if len(pending) < 2:
                pending += self._read_raw()
            if pending[:2] != b"\x1f\x8b":
                raise CorruptLayerError("garbage after the gzip stream", layer=self._layer)
            members += 1
            dec = _zlib_impl.decompressobj(31)
            output_full = False
            while not dec.eof:
                if not pending and not output_full:
                    pending = self._read_raw()
                    if not pending:
                        raise TruncatedLayerError("gzip stream is truncated", layer=self._layer)
                try:
                    # max_length bounds memory however well a hostile stream compresses.
                    out = dec.decompress(pending, _READ_SIZE)
                except _ZLIB_ERRORS as exc:
                    raise CorruptLayerError(f"corrupt gzip data: {exc}", layer=self._layer) from None
                pending = dec.unconsumed_tail
                output_full = len(out) == _READ_SIZE
                if out:
                    yield out
            pending = dec.unused_data + pending

    def _zstd(self, first: bytes) -> Iterator[bytes]:
        # stream_reader bounds each read's output; a truncated frame is not reported by zstandard, but
        # the tar level then misses its end-of-archive marker and raises TruncatedLayerError.
        joined = _Prepend(first, self._read_raw)
        reader = zstandard.ZstdDecompressor().stream_reader(
            cast(IO[bytes], joined), read_across_frames=True, closefd=False
        )
        while True:
            try:
                out = reader.read(_READ_SIZE)
            except zstandard.ZstdError as exc:
                raise CorruptLayerError(f"corrupt zstd data: {exc}", layer=self._layer) from None
            if not out:
                return
            yield out

    def read(self, size: int = -1) -> bytes:
        """Return up to ``size`` decompressed bytes (fewer near piece boundaries); b"" at the end."""
        if self._pending_pos >= len(self._pending):
            piece = next(self._pieces, b"")
            if not piece:
                return b""
            self._tar_hash.update(piece)
            self.tar_size += len(piece)
            self._pending, self._pending_pos = piece, 0
        if size < 0:
            size = len(self._pending)
        start = self._pending_pos
        self._pending_pos = min(start + size, len(self._pending))
        if start == 0 and self._pending_pos == len(self._pending):
            return self._pending
        return self._pending[start : self._pending_pos]

    def drain(self) -> None:
        """Consume the rest of the stream so digests and gzip CRCs cover all of it."""
        self._pending_pos = len(self._pending)
        for piece in self._pieces:
            self._tar_hash.update(piece)
            self.tar_size += len(piece)
        while self._read_raw():
            pass

    def close(self) -> None:
        """Stop the hashing thread."""
        self._hash_pool.shutdown(wait=True, cancel_futures=True)

    def digests(self) -> LayerDigests:
        """Digests of everything read so far (call after :meth:`drain`)."""
        return LayerDigests(
            compression=self.compression,
            compressed_size=self.compressed_size,
            compressed_sha256=self._compressed_hash.hexdigest(),
            tar_size=self.tar_size,
            diff_id="sha256:" + self._tar_hash.hexdigest(),
        )


class _Prepend(io.RawIOBase):
    """Raw stream that first returns ``first`` then calls ``more()`` (used to re-feed the sniffed bytes)."""

    def __init__(self, first: bytes, more: Callable[[], bytes]) -> None:
        self._buf = first
        self._more = more

    def readable(self) -> bool:
        """This stream is readable."""
        return True

    def read(self, size: int = -1) -> bytes:
        """Read up to ``size`` bytes."""
        if not self._buf:
            self._buf = self._more()
        if size < 0 or size >= len(self._buf):
            out, self._buf = self._buf, b""
            return out
        out, self._buf = self._buf[:size], self._buf[size:]
        return out

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` from the stream."""
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _detect(first: bytes, layer: int) -> LayerCompression:
    if first.startswith(b"\x1f\x8b"):
        return LayerCompression.GZIP
    if first.startswith(b"\x28\xb5\x2f\xfd"):
        return LayerCompression.ZSTD
    if first.startswith(b"BZh"):
        raise UnsupportedCompressionError("bzip2 layers are not supported by OCI", layer=layer)
    if first.startswith(b"\xfd7zXZ\x00"):
        raise UnsupportedCompressionError("xz layers are not supported by OCI", layer=layer)
    if not first:
        raise TruncatedLayerError("layer is empty", layer=layer)
    return LayerCompression.NONE


class _GuardedTarInfo(tarfile.TarInfo):
    """TarInfo that refuses oversized extended headers and turns tarfile's silent stops into errors."""

    max_header_size: ClassVar[int] = DEFAULT_MAX_HEADER_SIZE

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> _GuardedTarInfo:
        """Parse one header block, refusing PAX/GNU long headers over ``max_header_size``."""
        obj = super().frombuf(buf, encoding, errors)
        if obj.type in _HEADER_TYPES and obj.size > cls.max_header_size:
            # tarfile would read the whole extended header into memory; refuse before it does.
            raise HeaderTooLargeError(
                f"extended header of {obj.size} bytes exceeds the {cls.max_header_size}-byte limit"
            )
        return obj

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> _GuardedTarInfo:
        """Read the next member; a corrupt or truncated header raises instead of ending the archive."""
        try:
            return super().fromtarfile(tarfile_)
        except _EOFHeaderError:
            # An all-zero block: the archive's proper end-of-archive marker.
            if isinstance(tarfile_, _GuardedTarFile):
                tarfile_.clean_end = True
            raise
        except (_TruncatedHeaderError, _EmptyHeaderError):
            raise TruncatedLayerError("tar stream ends inside or before a header") from None
        except _InvalidHeaderError as exc:
            # Stock tarfile treats a bad header after the first as end-of-archive, which would
            # silently drop the rest of a corrupt layer.
            raise CorruptLayerError(f"invalid tar header: {exc}") from None


class _GuardedTarFile(tarfile.TarFile):
    """TarFile that records whether it met the end-of-archive marker."""

    clean_end = False


class LayerReader:
    """Streams the entries of one layer; use as a context manager and iterate :meth:`entries`."""

    def __init__(self, source: LayerInput, index: int = 0, *, max_header_size: int = DEFAULT_MAX_HEADER_SIZE):
        self.index = index
        self._owned: IO[bytes] | None = None
        raw: IO[bytes]
        if isinstance(source, bytes | bytearray | memoryview):
            raw = io.BytesIO(bytes(source))
        elif isinstance(source, str | os.PathLike):
            raw = self._owned = open(source, "rb")  # noqa: SIM115 - closed in close()
        else:
            raw = source
        try:
            self._stream = _DecompressingStream(raw, index)
            info_cls = type("_LimitedTarInfo", (_GuardedTarInfo,), {"max_header_size": max_header_size})
            self._tar = self._open_tar(info_cls)
        except BaseException:
            self.close()
            raise
        self._current: tarfile.TarInfo | None = None

    def _open_tar(self, info_cls: type[tarfile.TarInfo]) -> _GuardedTarFile:
        try:
            return _GuardedTarFile.open(
                fileobj=cast(BinaryIO, self._stream),
                mode="r|",
                bufsize=_TAR_BUFSIZE,
                tarinfo=info_cls,
                encoding=ENCODING,
                errors=ERRORS,
            )
        except CorruptLayerError as exc:
            if self._stream.compression is LayerCompression.NONE and not isinstance(exc, TruncatedLayerError):
                raise CorruptLayerError(
                    f"not a tar archive (nor gzip or zstd): {exc.message}", layer=self.index
                ) from None
            raise self._context(exc) from None
        except LayerError as exc:
            raise self._context(exc) from None
        except tarfile.ReadError as exc:
            kind = "gzip/zstd-compressed " if self._stream.compression is not LayerCompression.NONE else ""
            raise CorruptLayerError(f"not a {kind}tar archive: {exc}", layer=self.index) from None

    def __enter__(self) -> LayerReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the layer file if this reader opened it."""
        stream = getattr(self, "_stream", None)
        if stream is not None:
            stream.close()
        if self._owned is not None:
            self._owned.close()
            self._owned = None

    def _context(self, exc: LayerError, entry: str | None = None) -> LayerError:
        if exc.layer is None:
            exc.layer = self.index
        if exc.entry is None and entry is not None:
            exc.entry = entry
        return exc

    def entries(self) -> Iterator[TarEntry]:
        """Yield each entry; a regular file's content must be read with :meth:`read_chunks` before the next."""
        while True:
            try:
                info = self._tar.next()
            except LayerError as exc:
                raise self._context(exc, self._current.name if self._current else None) from None
            except (tarfile.ReadError, tarfile.StreamError, EOFError) as exc:
                raise TruncatedLayerError(f"tar stream is damaged: {exc}", layer=self.index) from None
            if info is None:
                break
            self._current = info
            # Stream mode keeps every TarInfo in .members (not in typeshed); we never need them again.
            cast(Any, self._tar).members.clear()
            try:
                yield self._to_entry(info)
            except ImageFormatError as exc:
                if isinstance(exc, LayerError):
                    raise self._context(exc, info.name) from None
                raise
        if not self._tar.clean_end:
            raise TruncatedLayerError("tar stream has no end-of-archive marker", layer=self.index)

    def _to_entry(self, info: tarfile.TarInfo) -> TarEntry:
        kind = _KINDS.get(info.type)
        if kind is None:
            raise UnsupportedEntryError(f"unsupported tar entry type {info.type!r}")
        pax = info.pax_headers
        mtime, mtime_nsec = parse_mtime(pax.get("mtime"), info.mtime)
        for label, value in (("uid", info.uid), ("gid", info.gid)):
            raw = pax.get(label)
            # tarfile maps an unparsable PAX number to 0 (root); refuse instead of guessing.
            if raw is not None and not (raw.isascii() and raw.isdigit() and len(raw) <= 20):
                raise UnsupportedEntryError(f"invalid PAX {label} {raw[:40]!r}")
            if not 0 <= value <= _U32:
                raise UnsupportedEntryError(f"{label} {value} out of range")
        entry = TarEntry(
            name=info.name,
            path=split_path(info.name),
            kind=kind,
            mode=info.mode & 0o7777,
            uid=info.uid,
            gid=info.gid,
            mtime=mtime,
            mtime_nsec=mtime_nsec,
            size=info.size if kind is EntryKind.REG else 0,
            xattrs=parse_xattrs(pax) if pax else {},
            sparse=info.sparse is not None,
        )
        if kind is EntryKind.SYMLINK:
            if len(encode_name(info.linkname)) > PATH_MAX:
                raise UnsupportedEntryError(f"symlink target longer than {PATH_MAX} bytes")
            entry.link_target = info.linkname
        elif kind is EntryKind.HARDLINK:
            entry.link_target = info.linkname
            entry.link_path = _link_path(info.linkname)
        elif kind in (EntryKind.CHR, EntryKind.BLK):
            if not (0 <= info.devmajor <= _U32 and 0 <= info.devminor <= _U32):
                raise UnsupportedEntryError("device number out of range")
            entry.devmajor, entry.devminor = info.devmajor, info.devminor
        return entry

    def read_chunks(self, entry: TarEntry, chunk_size: int) -> Iterator[bytes]:
        """Yield the current regular file's content in ``chunk_size`` pieces (the last may be shorter)."""
        remaining = entry.size
        if entry.sparse:
            # Sparse members need tarfile's hole map; they are rare, so take its slower path.
            assert self._current is not None
            reader: Any = self._tar.extractfile(self._current)
        else:
            # Reading the stream directly skips two buffering layers of extractfile().
            reader = self._tar.fileobj
        while remaining > 0:
            want = min(chunk_size, remaining)
            try:
                data = reader.read(want)
            except (tarfile.ReadError, tarfile.StreamError) as exc:
                raise TruncatedLayerError(f"file data is damaged: {exc}", layer=self.index, entry=entry.name) from None
            except LayerError as exc:
                raise self._context(exc, entry.name) from None
            if len(data) != want:
                raise TruncatedLayerError("file data is truncated", layer=self.index, entry=entry.name)
            remaining -= want
            yield data

    def finish(self) -> LayerDigests:
        """Drain the rest of the layer (end padding, gzip trailer) and return its digests."""
        try:
            self._stream.drain()
        except LayerError as exc:
            raise self._context(exc) from None
        return self._stream.digests()


def _link_path(linkname: str) -> tuple[str, ...]:
    try:
        return split_path(linkname)
    except UnsafePathError as exc:
        raise HardLinkError(f"hard link target {linkname!r} is unsafe: {exc.message}") from None
