"""Bootstrap format: determinism, loading, integrity checks, lookups, prefetch, and the check helpers."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest

from shared.image_format import (
    Bootstrap,
    BootstrapError,
    FileType,
    ImageTree,
    NotDirectoryError,
    UnsupportedVersionError,
    compare_trees,
    reference_tree,
)
from shared.image_format.bootstrap import HEADER, VERSION_MAJOR

from .helpers import blk_dev, chr_dev, convert, d, f, fifo, hl, make_tar, opq, sym, wh


def _layers() -> list[bytes]:
    """A three-layer image exercising most merge rules, with content duplicated across layers."""
    big = bytes(range(256)) * 100
    base = make_tar(
        [
            d("."),
            d("etc", mode=0o755),
            f("etc/os-release", b"ID=test\n", mtime=1_600_000_000),
            f("etc/big", big),
            hl("etc/big-link", "etc/big"),
            sym("bin", "usr/bin"),
            d("usr/bin"),
            f("usr/bin/tool", b"#!/bin/sh\necho hi\n", mode=0o755, pax={"SCHILY.xattr.user.a": "1"}),
            d("var/cache/apt"),
            f("var/cache/apt/pkgs", big[:5000]),
            f("var/cache/apt/more", b"m"),
            chr_dev("dev/null", 1, 3),
            blk_dev("dev/loop0", 7, 0),
            fifo("run/initctl"),
            f("zero", bytes(20000)),
        ],
        compress=True,
    )
    middle = make_tar(
        [
            wh("etc/os-release"),
            opq("var/cache/apt"),
            f("var/cache/apt/fresh", b"f"),
            f("etc/big", b"replaced"),
            f("usr/bin/tool2", big),  # same content as the lower etc/big: dedups across layers
        ]
    )
    top = make_tar(
        [
            f("etc/os-release", b"ID=top\n", pax={"mtime": "1700000000.5"}),
            d("usr/bin", mode=0o700, uid=3),
            f("dev", b"dev is now a file"),
            f("empty"),
        ],
        compress=True,
    )
    return [base, middle, top]


def test_conversion_is_reproducible_and_thread_independent(tmp_path: Path) -> None:
    layers = _layers()
    outputs = []
    for i, workers in enumerate([0, 0, 1, 3]):
        c = convert(tmp_path / str(i), layers, workers=workers, prefetch_files=["/bin/tool", "/etc"])
        blobs = [(b.sha256, b.path.read_bytes()) for b in c.result.blobs]
        outputs.append((c.result.bootstrap_path.read_bytes(), blobs))
        assert hashlib.sha256(outputs[-1][0]).hexdigest() == c.result.bootstrap_sha256
        for sha, data in blobs:
            assert hashlib.sha256(data).hexdigest() == sha
    assert all(o == outputs[0] for o in outputs[1:])


def test_reference_and_converted_trees_agree(tmp_path: Path) -> None:
    layers = _layers()
    c = convert(tmp_path, layers)
    expected = reference_tree(layers)
    actual = ImageTree(c.boot, c.source).entries()
    assert compare_trees(expected, actual) == []
    assert "/etc/os-release" in actual and actual["/etc/os-release"].mtime_ns == 1_700_000_000_500_000_000
    assert sorted(p for p in actual if p.startswith("/var")) == [
        "/var",
        "/var/cache",
        "/var/cache/apt",
        "/var/cache/apt/fresh",
    ]
    assert actual["/dev"].type == FileType.REG
    assert (
        actual["/etc/big-link"].nlink == 1
        and actual["/etc/big"].content_sha256 != actual["/etc/big-link"].content_sha256
    )


def test_compare_trees_reports_differences(tmp_path: Path) -> None:
    layers = _layers()
    c = convert(tmp_path, layers)
    expected = reference_tree(layers)
    actual = dict(ImageTree(c.boot, c.source).entries())
    from dataclasses import replace

    actual["/etc/big"] = replace(actual["/etc/big"], mode=0o600, content_sha256="0" * 64)
    del actual["/empty"]
    diffs = {(d.path, d.field) for d in compare_trees(expected, actual)}
    assert diffs == {("/etc/big", "mode"), ("/etc/big", "content_sha256"), ("/empty", "presence")}


def test_load_from_bytes_and_path_and_api(tmp_path: Path) -> None:
    c = convert(tmp_path, _layers(), prefetch_files=["/bin/tool", "/etc", "/missing", "/bin/tool"])
    data = c.result.bootstrap_path.read_bytes()
    for boot in (Bootstrap.load(data), Bootstrap.load(c.result.bootstrap_path), Bootstrap.load(bytearray(data))):
        assert boot.version == (1, 0) and boot.chunk_size == 4096 and boot.size == len(data)
        root = boot.root
        assert root.ino == 1 and root.is_dir and root.parent == 1
        names = [e.name for e in boot.readdir(root)]
        assert names == sorted(names, key=lambda n: n.encode()) and "etc" in names
        tool = boot.lookup("/usr/bin/tool")
        assert boot.lookup("/bin/tool", follow_symlinks=True) == tool  # intermediate symlink followed
        assert boot.lookup("/bin").is_symlink and boot.lookup("/bin", follow_symlinks=True).is_dir
        assert boot.lookup("usr/./bin/../bin/tool") == tool
        assert boot.lookup("/bin/").is_dir and boot.lookup("/bin/.").is_dir  # a trailing slash follows the link
        with pytest.raises(NotDirectoryError):
            boot.lookup("/usr/bin/tool/")
        assert boot.lookup("/usr/bin").permissions == 0o700
        assert boot.getxattr(tool, "user.a") == b"1"
        assert boot.getattr(tool.ino) == tool
        entry = next(e for e in boot.readdir(boot.lookup("/usr/bin")) if e.name == "tool")
        assert (entry.ino, entry.type) == (tool.ino, FileType.REG)
        # nlink: directories count their subdirectories.
        assert boot.lookup("/usr").nlink == 3
        # Prefetch keeps the given order, follows symlinks, dedups and drops missing paths.
        assert boot.prefetch_inodes() == [tool.ino, boot.lookup("/etc").ino]
        prefetch = boot.prefetch_files()
        assert prefetch[0] == tool.ino and boot.lookup("/etc/os-release").ino in prefetch
        assert all(boot.getattr(i).is_reg for i in prefetch)
    assert c.result.stats.prefetch_missing == ["/missing"]


def test_stats(tmp_path: Path) -> None:
    c = convert(tmp_path, _layers())
    s = c.result.stats
    assert s.entries == sum(layer.entries for layer in s.layers) == 15 + 5 + 4
    assert s.files == len([e for e in c.tree().values() if e.type == FileType.REG]) - s.hardlinks
    assert s.unique_chunks < s.chunks and s.dedup_ratio > 1
    assert s.compressed_bytes == sum(b.size for b in c.result.blobs)
    assert s.bootstrap_size == c.result.bootstrap_size == c.result.bootstrap_path.stat().st_size
    assert [layer.compression for layer in s.layers] == ["gzip", "none", "gzip"]
    assert all(layer.diff_id.startswith("sha256:") for layer in s.layers)
    assert s.tar_bytes > 0 and s.elapsed_seconds > 0 and s.throughput_mb_s > 0


def _reseal(data: bytearray) -> bytes:
    data[32:64] = b"\0" * 32
    data[32:64] = hashlib.sha256(data).digest()
    return bytes(data)


def test_integrity_checks(tmp_path: Path) -> None:
    data = bytearray(convert(tmp_path, _layers()).result.bootstrap_path.read_bytes())
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 1
    with pytest.raises(BootstrapError, match="checksum"):
        Bootstrap.load(bytes(flipped))
    Bootstrap.load(bytes(flipped), verify=False)  # the caller may skip the sha256 if it trusts the source
    with pytest.raises(BootstrapError, match="magic"):
        Bootstrap.load(b"NOTABOOT" + bytes(data[8:]))
    with pytest.raises(BootstrapError):
        Bootstrap.load(bytes(data[:-8]))
    with pytest.raises(BootstrapError):
        Bootstrap.load(bytes(data[:10]))
    future = bytearray(data)
    struct.pack_into("<H", future, 8, VERSION_MAJOR + 1)
    with pytest.raises(UnsupportedVersionError):
        Bootstrap.load(_reseal(future))
    newer_minor = bytearray(data)
    struct.pack_into("<H", newer_minor, 10, 7)
    assert Bootstrap.load(_reseal(newer_minor)).version == (1, 7)
    bad_section = bytearray(data)
    struct.pack_into("<QQ", bad_section, HEADER.size, len(data) - 8, 64)
    with pytest.raises(BootstrapError, match="outside"):
        Bootstrap.load(_reseal(bad_section))
