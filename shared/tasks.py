"""Task and piece arithmetic shared by every service: task ids, piece sizes, piece ranges, HTTP ranges.

A *task* is one blob (one URL's content); it is cut into fixed-size *pieces*, the unit peers exchange.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from shared.errors import InvalidRequest, RangeNotSatisfiable

MIB = 1024 * 1024
DEFAULT_PIECE_SIZE = 4 * MIB
# Blobs up to this size are cut in 1 MiB pieces (at most 64 of them). Lazy readers fetch a layer in
# ranges, and the piece is what the origin and the peers send for a range: 4 MiB pieces made a cold
# `python3 -V` take 30 MB from the origin for the 10 MB it reads; 1 MiB pieces, close to Nydus's chunk
# size, keep that near what is read, at the price of more (still few) pieces per blob.
SMALL_BLOB_LIMIT = 64 * MIB
SMALL_PIECE_SIZE = 1 * MIB
# Above that, Dragonfly's rule: 4 MiB pieces up to 200 MiB; above that one more MiB per started 100 MiB,
# capped at 15 MiB, so a 10 GiB layer has ~700 pieces instead of 2,560 (fewer announcements and requests).
PIECE_SIZE_GROWTH_THRESHOLD = 200 * MIB
PIECE_SIZE_GROWTH_STEP = 100 * MIB
MAX_PIECE_SIZE = 15 * MIB
# A blob whose first reader reads ranges (a lazy mount, no prefetch) is cut finer: Nydus chunks are
# about 1 MiB of file data and a merged read is a few hundred KiB, so 1 MiB pieces made the origin send
# 1.5x what a cold `python3 -V` reads; 256 KiB pieces send 0.9x. Whole-blob pullers keep the sizes above:
# per-piece costs (a request, a hash, an announcement) made 3 concurrent pulls 38 % slower with 512 KiB.
RANGED_PIECE_SIZE = 256 * 1024
# ... with at most this many pieces, so a huge lazily read blob does not make a huge piece map.
RANGED_MAX_PIECES = 4096
# Any proposed piece size must be a multiple of this, within [PIECE_SIZE_UNIT, MAX_PIECE_SIZE].
PIECE_SIZE_UNIT = 64 * 1024

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_BLOB_PATH_RE = re.compile(r"/v2/(?P<name>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")


def piece_size_for(content_length: int) -> int:
    """The piece size for a blob of ``content_length`` bytes."""
    if content_length < 0:
        raise InvalidRequest(f"negative content length {content_length}")
    if content_length <= SMALL_BLOB_LIMIT:
        return SMALL_PIECE_SIZE
    if content_length <= PIECE_SIZE_GROWTH_THRESHOLD:
        return DEFAULT_PIECE_SIZE
    extra_mib = -(-content_length // PIECE_SIZE_GROWTH_STEP)
    return min(DEFAULT_PIECE_SIZE + extra_mib * MIB, MAX_PIECE_SIZE)


def ranged_piece_size_for(content_length: int) -> int:
    """The piece size a range reader proposes for a blob nobody has registered yet.

    256 KiB, doubled until the blob has at most ``RANGED_MAX_PIECES`` pieces, never above the size a
    whole-blob reader would use.
    """
    whole = piece_size_for(content_length)
    size = RANGED_PIECE_SIZE
    while size < whole and piece_count(content_length, size) > RANGED_MAX_PIECES:
        size *= 2
    return min(size, whole)


def check_piece_size(piece_size: int) -> int:
    """``piece_size`` if it is a valid piece size (a multiple of 64 KiB, 64 KiB to 15 MiB), else InvalidRequest."""
    if not PIECE_SIZE_UNIT <= piece_size <= MAX_PIECE_SIZE or piece_size % PIECE_SIZE_UNIT:
        raise InvalidRequest(
            f"piece size {piece_size} must be a multiple of {PIECE_SIZE_UNIT} between {PIECE_SIZE_UNIT} "
            f"and {MAX_PIECE_SIZE} bytes"
        )
    return piece_size


def piece_count(content_length: int, piece_size: int) -> int:
    """How many pieces a blob has (0 for an empty blob)."""
    return -(-content_length // piece_size)


@dataclass(frozen=True)
class PieceRange:
    """Where one piece lies in its blob."""

    number: int
    start: int
    length: int

    @property
    def end(self) -> int:
        """The offset just past the piece."""
        return self.start + self.length


def piece_range(number: int, content_length: int, piece_size: int) -> PieceRange:
    """The byte range of piece ``number``."""
    count = piece_count(content_length, piece_size)
    if not 0 <= number < count:
        raise InvalidRequest(f"piece {number} out of range (blob has {count} pieces)")
    start = number * piece_size
    return PieceRange(number, start, min(piece_size, content_length - start))


def pieces_covering(start: int, end_inclusive: int, piece_size: int) -> range:
    """Numbers of the pieces that hold bytes ``start..end_inclusive``."""
    return range(start // piece_size, end_inclusive // piece_size + 1)


def parse_range_header(header: str | None, content_length: int) -> tuple[int, int] | None:
    """Parse a single-range ``Range: bytes=…`` header into ``(start, end_inclusive)``.

    ``None`` when there is no header (the whole blob). A syntactically valid range that lies outside the
    blob (or any range on an empty blob) raises RangeNotSatisfiable (HTTP 416); multiple ranges are not
    supported and raise InvalidRequest.
    """
    if header is None or header.strip() == "":
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or not spec:
        raise RangeNotSatisfiable(f"unsupported range {header!r}", content_length=content_length)
    if "," in spec:
        raise InvalidRequest("multiple ranges are not supported")
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        raise RangeNotSatisfiable(f"malformed range {header!r}", content_length=content_length)
    if first == "":
        if last == "" or int(last) == 0 or content_length == 0:
            raise RangeNotSatisfiable(f"unsatisfiable range {header!r}", content_length=content_length)
        suffix = min(int(last), content_length)
        return content_length - suffix, content_length - 1
    start = int(first)
    end = int(last) if last else content_length - 1
    if start >= content_length or end < start:
        raise RangeNotSatisfiable(f"unsatisfiable range {header!r}", content_length=content_length)
    return start, min(end, content_length - 1)


def filtered_url(url: str, filters: list[str] | tuple[str, ...]) -> str:
    """``url`` without the query parameters named in ``filters`` (Dragonfly's ``defaultFilter``).

    The remaining parameters are sorted so the same resource behind differently-ordered signed URLs is
    one task.
    """
    parts = urlsplit(url)
    dropped = {name for name in filters if name}
    query = sorted((key, value) for key, value in parse_qsl(parts.query, keep_blank_values=True) if key not in dropped)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))


def parse_filter(spec: str) -> tuple[str, ...]:
    """``"Expires&Signature&ns"`` → ``("Expires", "Signature", "ns")``."""
    return tuple(name for name in spec.split("&") if name)


def task_id_for_url(url: str, filters: list[str] | tuple[str, ...] = ()) -> str:
    """The task id of a URL: sha256 of the URL with filtered parameters removed."""
    return hashlib.sha256(filtered_url(url, filters).encode()).hexdigest()


def task_id_for_digest(digest: str) -> str:
    """The task id of a content-addressed blob: sha256 of its digest, whichever registry serves it."""
    if not _DIGEST_RE.match(digest):
        raise InvalidRequest(f"not a sha256 digest: {digest!r}")
    return hashlib.sha256(digest.encode()).hexdigest()


def blob_digest_in(url_path: str) -> str | None:
    """The ``sha256:…`` digest of an OCI blob URL path (``/v2/<name>/blobs/<digest>``), if it is one."""
    match = _BLOB_PATH_RE.search(url_path)
    return match.group("digest") if match else None


def sha256_digest(data: bytes | memoryview) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()
