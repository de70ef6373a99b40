"""Hostile and broken layers: every one must fail with a clear ImageFormatError subclass, writing nothing."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
from pathlib import Path
from typing import IO, cast

import pytest

from shared.image_format import (
    CorruptLayerError,
    HeaderTooLargeError,
    ImageFormatError,
    LayerError,
    LayerInput,
    TruncatedLayerError,
    UnsafePathError,
    UnsupportedCompressionError,
    UnsupportedEntryError,
)
from shared.image_format.tar_reader import LayerReader

from .helpers import convert, d, f, make_tar, sym

GOOD = [d("etc"), f("etc/a", b"a" * 5000), f("etc/b", b"b" * 100)]


def _fails(tmp_path: Path, layer: bytes, error: type[Exception]) -> LayerError:
    work = tmp_path / "work"
    with pytest.raises(error) as err:
        convert(work, [make_tar([f("ok", b"fine")]), layer])
    assert isinstance(err.value, ImageFormatError)
    assert isinstance(err.value, LayerError) and err.value.layer == 1, str(err.value)
    # No bootstrap and no half-written blob is left behind; nothing appears outside the work dir.
    assert not (work / "bootstrap").exists()
    assert not list((work / "blobs" / "sha256").glob(".*.tmp"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    return err.value


@pytest.mark.parametrize(
    "name",
    ["../evil", "a/../../evil", "a/../b", "./../x", "/../../etc/passwd", "x/" + "n" * 256, "a\x00b"],
)
def test_unsafe_names_are_rejected(tmp_path: Path, name: str) -> None:
    # The name goes in a PAX "path" record so it reaches the reader byte for byte (even with a NUL).
    layer = make_tar([f("placeholder", b"x", pax={"path": name})])
    err = _fails(tmp_path, layer, UnsafePathError)
    assert err.entry is not None


def test_overlong_path_is_rejected(tmp_path: Path) -> None:
    _fails(tmp_path, make_tar([f("/".join(["d" * 200] * 21), b"x")]), UnsafePathError)


def test_absolute_and_dotted_names_are_normalised(tmp_path: Path) -> None:
    layer = make_tar([f("/abs/file", b"1"), f("./dot/./file", b"2"), f("slash//file", b"3")])
    tree = convert(tmp_path, [layer]).tree()
    assert {"/abs/file", "/dot/file", "/slash/file"} <= tree.keys()


def test_invalid_whiteout_names(tmp_path: Path) -> None:
    _fails(tmp_path, make_tar([f("dir/.wh.")]), UnsafePathError)
    _fails(tmp_path / "b", make_tar([f(".wh.x/child", b"")]), UnsupportedEntryError)


def test_huge_pax_header_is_refused_before_reading_it(tmp_path: Path) -> None:
    layer = make_tar([f("x", b"1", pax={"comment": "A" * (2 << 20)})])
    _fails(tmp_path, layer, HeaderTooLargeError)


def test_huge_gnu_long_name_is_refused(tmp_path: Path) -> None:
    # A GNU long-name record claiming 64 MiB: refused from its header alone, before any read.
    header = tarfile.TarInfo("././@LongLink")
    header.type = tarfile.GNUTYPE_LONGNAME
    header.size = 64 << 20
    layer = header.tobuf(format=tarfile.GNU_FORMAT) + b"x" * 4096
    _fails(tmp_path, layer, HeaderTooLargeError)


def test_header_limit_is_configurable(tmp_path: Path) -> None:
    layer = make_tar([f("x", b"1", pax={"comment": "A" * 4000})])
    with pytest.raises(HeaderTooLargeError):
        convert(tmp_path / "a", [layer], max_header_size=1024)
    convert(tmp_path / "b", [layer])


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95])
def test_truncated_gzip_layer(tmp_path: Path, cut: float) -> None:
    layer = make_tar(GOOD, compress=True)
    _fails(tmp_path, layer[: int(len(layer) * cut)], TruncatedLayerError)


def test_gzip_missing_trailer(tmp_path: Path) -> None:
    layer = make_tar(GOOD, compress=True)
    _fails(tmp_path, layer[:-4], TruncatedLayerError)


@pytest.mark.parametrize("cut", [100, 700, 3000, 6000])
def test_truncated_plain_layer(tmp_path: Path, cut: int) -> None:
    _fails(tmp_path, make_tar(GOOD)[:cut], TruncatedLayerError)


def test_tar_without_end_marker_is_truncated(tmp_path: Path) -> None:
    _fails(tmp_path, make_tar(GOOD, eof=False), TruncatedLayerError)


def test_corrupt_header_in_the_middle_is_not_silently_ignored(tmp_path: Path) -> None:
    raw = bytearray(make_tar(GOOD, fmt=tarfile.USTAR_FORMAT))
    # Second header (etc/a) starts at 512; smash its checksum field.
    raw[512 + 148 : 512 + 156] = b"99999999"
    _fails(tmp_path, bytes(raw), CorruptLayerError)


def test_corrupt_gzip_data(tmp_path: Path) -> None:
    layer = bytearray(make_tar(GOOD, compress=True))
    layer[30:60] = b"\xff" * 30
    _fails(tmp_path, bytes(layer), CorruptLayerError)


def test_garbage_after_gzip_stream(tmp_path: Path) -> None:
    _fails(tmp_path, make_tar(GOOD, compress=True) + b"garbage", CorruptLayerError)


def test_zero_padding_and_multi_member_gzip_are_fine(tmp_path: Path) -> None:
    raw = make_tar(GOOD)
    layer = gzip.compress(raw[:1000], mtime=0) + gzip.compress(raw[1000:], mtime=0) + b"\x00" * 512
    assert convert(tmp_path, [layer]).content("/etc/a") == b"a" * 5000


@pytest.mark.parametrize("data", [b"this is not a tar archive at all" * 40, b"\x00" * 100, b"x"])
def test_not_a_tar(tmp_path: Path, data: bytes) -> None:
    _fails(tmp_path, data, CorruptLayerError)


def test_empty_layer_file(tmp_path: Path) -> None:
    _fails(tmp_path, b"", TruncatedLayerError)


def test_empty_tar_is_a_valid_empty_layer(tmp_path: Path) -> None:
    c = convert(tmp_path, [make_tar([f("a", b"1")]), make_tar([])])
    assert [layer.blob for layer in c.result.stats.layers][1] is None


@pytest.mark.parametrize("packer", [bz2.compress, lzma.compress], ids=["bzip2", "xz"])
def test_non_oci_compression(tmp_path: Path, packer: object) -> None:
    _fails(tmp_path, packer(make_tar(GOOD)), UnsupportedCompressionError)  # type: ignore[operator]


def test_zstd_layer(tmp_path: Path) -> None:
    import zstandard

    layer = zstandard.ZstdCompressor().compress(make_tar(GOOD))
    c = convert(tmp_path, [layer])
    assert c.content("/etc/b") == b"b" * 100
    assert c.result.stats.layers[0].compression == "zstd"


def test_truncated_zstd_layer(tmp_path: Path) -> None:
    import zstandard

    layer = zstandard.ZstdCompressor().compress(make_tar([f("big", bytes(range(256)) * 400)]))
    _fails(tmp_path, layer[: len(layer) // 2], TruncatedLayerError)


@pytest.mark.parametrize("field", ["uid", "gid"])
def test_ids_out_of_range(tmp_path: Path, field: str) -> None:
    _fails(tmp_path, make_tar([f("x", b"", pax={field: str(1 << 40)})]), UnsupportedEntryError)


@pytest.mark.parametrize("value", ["1e400000", "1e999999999", "nan", "-1e30", "12abc"])
def test_bad_pax_mtime(tmp_path: Path, value: str) -> None:
    _fails(tmp_path, make_tar([f("x", b"", pax={"mtime": value})]), UnsupportedEntryError)


@pytest.mark.parametrize("value", ["9" * 5000, "-5", "0x10", "1e3"])
def test_unparsable_pax_uid_is_not_mapped_to_root(tmp_path: Path, value: str) -> None:
    _fails(tmp_path, make_tar([f("x", b"", pax={"uid": value})]), UnsupportedEntryError)


def test_oversized_xattr(tmp_path: Path) -> None:
    layer = make_tar([f("x", b"", pax={"SCHILY.xattr.user.big": "v" * 70000})])
    _fails(tmp_path, layer, UnsupportedEntryError)


def test_unknown_entry_type(tmp_path: Path) -> None:
    info = tarfile.TarInfo("weird")
    info.type = b"V"  # volume header
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        tf.addfile(info)
    _fails(tmp_path, buf.getvalue(), UnsupportedEntryError)


def test_overlong_symlink_target(tmp_path: Path) -> None:
    _fails(tmp_path, make_tar([sym("s", "t" * 5000)]), UnsupportedEntryError)


def test_device_nodes_are_metadata_only(tmp_path: Path) -> None:
    from .helpers import blk_dev, chr_dev

    c = convert(tmp_path, [make_tar([chr_dev("dev/mem", 1, 1), blk_dev("dev/sda", 8, 0)])])
    assert c.boot.lookup("/dev/mem").rdev_major == 1
    assert not any(p.is_char_device() or p.is_block_device() for p in tmp_path.rglob("*"))


def test_layer_reader_reports_digests() -> None:
    import hashlib

    raw = make_tar(GOOD)
    layer = gzip.compress(raw, mtime=0)
    with LayerReader(layer) as reader:
        names = [e.name for e in reader.entries()]
        digests = reader.finish()
    assert names == ["etc", "etc/a", "etc/b"]
    assert digests.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert digests.compressed_sha256 == hashlib.sha256(layer).hexdigest()
    assert (digests.tar_size, digests.compressed_size) == (len(raw), len(layer))


def test_layer_inputs_can_be_paths_streams_or_bytes(tmp_path: Path) -> None:
    raw = make_tar([f("a", b"A")])
    path = tmp_path / "layer.tar"
    path.write_bytes(raw)
    results = []
    inputs: list[LayerInput] = [raw, path, str(path), io.BytesIO(raw)]
    for i, layer in enumerate(inputs):
        results.append(convert(tmp_path / f"w{i}", [layer]).result.bootstrap_sha256)
    assert len(set(results)) == 1


class _Dribble(io.RawIOBase):
    """A pipe-like stream that returns at most 3 bytes per read."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        out, self._data = self._data[:3], self._data[3:]
        return out


@pytest.mark.parametrize("compress", [False, True])
def test_short_reads_from_a_pipe(tmp_path: Path, compress: bool) -> None:
    layer = make_tar([f("a", b"A" * 3000), f("b", b"B")], compress=compress)
    c = convert(tmp_path, [cast(IO[bytes], _Dribble(layer))])
    assert c.content("/a") == b"A" * 3000 and c.content("/b") == b"B"
