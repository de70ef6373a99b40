"""Layer merge semantics: whiteouts, opaque directories, links, replacement, metadata round trip."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from shared.image_format import FileType, HardLinkError, NotFoundError, PathConflictError

from .helpers import blk_dev, chr_dev, convert, d, f, fifo, hl, make_tar, opq, sym, wh


def test_all_entry_types_round_trip(tmp_path: Path) -> None:
    layer = make_tar(
        [
            d(".", mode=0o755, mtime=1_600_000_000),
            d("etc", mode=0o750, uid=1, gid=2),
            f("etc/passwd", b"root:x:0:0\n", mode=0o644, uid=0, gid=0, mtime=1_650_000_000),
            f("etc/empty", b""),
            f("etc/suid", b"#!", mode=0o4755),
            sym("etc/link", "passwd"),
            sym("etc/abs", "/etc/passwd"),
            hl("etc/hard", "etc/passwd"),
            chr_dev("dev/null", 1, 3),
            blk_dev("dev/sda", 8, 0),
            fifo("run/pipe"),
            f(
                "bin/ping",
                b"ELF",
                mode=0o755,
                pax={"SCHILY.xattr.security.capability": "\x01\x00\x00\x02", "SCHILY.xattr.user.k": "v"},
            ),
            f("nsec", b"x", pax={"mtime": "1700000000.123456789"}),
        ]
    )
    c = convert(tmp_path, [layer])
    t = c.tree()
    assert t["/"].mtime_ns == 1_600_000_000 * 10**9
    assert (t["/etc"].mode, t["/etc"].uid, t["/etc"].gid, t["/etc"].type) == (0o750, 1, 2, FileType.DIR)
    passwd = t["/etc/passwd"]
    assert passwd.content == b"root:x:0:0\n" and passwd.size == 11 and passwd.nlink == 2
    assert t["/etc/hard"].content == b"root:x:0:0\n"
    assert c.boot.lookup("/etc/hard").ino == c.boot.lookup("/etc/passwd").ino
    assert t["/etc/empty"].content == b"" and c.boot.file_chunks(c.boot.lookup("/etc/empty")) == []
    assert t["/etc/suid"].mode == 0o4755
    assert t["/etc/link"].link_target == "passwd" and t["/etc/link"].size == len("passwd")
    assert t["/etc/abs"].link_target == "/etc/passwd"
    assert (t["/dev/null"].type, t["/dev/null"].rdev) == (FileType.CHR, (1, 3))
    assert (t["/dev/sda"].type, t["/dev/sda"].rdev) == (FileType.BLK, (8, 0))
    assert c.boot.lookup("/dev/null").rdev == __import__("os").makedev(1, 3)
    assert t["/run/pipe"].type == FileType.FIFO
    assert dict(t["/bin/ping"].xattrs) == {"security.capability": b"\x01\x00\x00\x02", "user.k": b"v"}
    assert c.boot.listxattr(c.boot.lookup("/bin/ping")) == ["security.capability", "user.k"]
    assert t["/nsec"].mtime_ns == 1_700_000_000_123_456_789
    # Implicit parents of dev/null, run/pipe, bin/ping.
    for implicit in ("/dev", "/run", "/bin"):
        assert (t[implicit].type, t[implicit].mode, t[implicit].mtime_ns) == (FileType.DIR, 0o755, 0)
    assert stat.S_ISREG(c.boot.lookup("/etc/passwd").mode)


def test_binary_xattr_and_non_utf8_names_round_trip(tmp_path: Path) -> None:
    raw_name = b"caf\xe9.txt".decode("utf-8", "surrogateescape")
    value = bytes(range(256)).decode("utf-8", "surrogateescape")
    layer = make_tar([f(raw_name, b"latin-1 name", pax={"SCHILY.xattr.user.bin": value})])
    c = convert(tmp_path, [layer])
    [entry] = c.boot.readdir(c.boot.root)
    assert entry.name.encode("utf-8", "surrogateescape") == b"caf\xe9.txt"
    assert c.boot.getxattr(entry.ino, "user.bin") == bytes(range(256))
    assert c.content("/" + raw_name) == b"latin-1 name"


def test_whiteout_deletes_lower_file_and_subtree(tmp_path: Path) -> None:
    lower = make_tar([f("a/keep", b"1"), f("a/gone", b"2"), f("dir/sub/x", b"3"), f("dir/y", b"4")])
    upper = make_tar([wh("a/gone"), wh("dir"), wh("never/existed")])
    t = convert(tmp_path, [lower, upper]).tree()
    assert "/a/keep" in t and "/a/gone" not in t
    assert not any(p.startswith("/dir") for p in t)
    assert "/never" in t and t["/never"].type == FileType.DIR  # parent of a whiteout exists in the upper layer


def test_whiteout_only_hides_lower_layers_whatever_the_tar_order(tmp_path: Path) -> None:
    lower = make_tar([f("x", b"old")])
    # The replacement comes before its own whiteout in the tar: it must survive.
    upper = make_tar([f("x", b"new"), wh("x")])
    assert convert(tmp_path, [lower, upper]).content("/x") == b"new"


def test_opaque_directory_hides_lower_contents_only(tmp_path: Path) -> None:
    lower = make_tar([d("app"), f("app/old1", b"1"), f("app/sub/old2", b"2"), f("other", b"o")])
    upper = make_tar([f("app/new", b"n"), opq("app"), d("app", mode=0o700)])
    t = convert(tmp_path, [lower, upper]).tree()
    assert sorted(p for p in t if p.startswith("/app")) == ["/app", "/app/new"]
    assert t["/app"].mode == 0o700
    assert "/other" in t


def test_opaque_root(tmp_path: Path) -> None:
    lower = make_tar([f("a", b"1"), f("b/c", b"2")])
    upper = make_tar([f(".wh..wh..opq"), f("z", b"3")])
    assert sorted(convert(tmp_path, [lower, upper]).tree()) == ["/", "/z"]


def test_file_replaces_directory_and_directory_replaces_file(tmp_path: Path) -> None:
    lower = make_tar([f("p/q/r", b"deep"), f("s", b"file")])
    upper = make_tar([f("p", b"now a file"), d("s"), f("s/inside", b"i")])
    c = convert(tmp_path, [lower, upper])
    t = c.tree()
    assert t["/p"].type == FileType.REG and not any(k.startswith("/p/") for k in t)
    assert t["/s"].type == FileType.DIR and t["/s/inside"].content == b"i"


def test_directory_over_directory_keeps_children_and_updates_metadata(tmp_path: Path) -> None:
    lower = make_tar([d("etc", mode=0o755, uid=0), f("etc/a", b"a")])
    upper = make_tar([d("etc", mode=0o700, uid=5, pax={"SCHILY.xattr.user.x": "1"}), f("etc/b", b"b")])
    t = convert(tmp_path, [lower, upper]).tree()
    assert (t["/etc"].mode, t["/etc"].uid, t["/etc"].xattrs) == (0o700, 5, (("user.x", b"1"),))
    assert "/etc/a" in t and "/etc/b" in t


def test_later_entry_in_same_layer_wins(tmp_path: Path) -> None:
    layer = make_tar([f("x", b"first"), f("x", b"second", mode=0o600)])
    t = convert(tmp_path, [layer]).tree()
    assert (t["/x"].content, t["/x"].mode) == (b"second", 0o600)


def test_hard_link_to_lower_layer_and_link_breaking(tmp_path: Path) -> None:
    lower = make_tar([f("bin/a", b"shared"), hl("bin/b", "bin/a")])
    upper = make_tar([hl("usr/c", "bin/a"), f("bin/a", b"replaced")])
    c = convert(tmp_path, [lower, upper])
    t = c.tree()
    assert t["/bin/a"].content == b"replaced" and t["/bin/a"].nlink == 1
    assert t["/bin/b"].content == b"shared" and t["/bin/b"].nlink == 2
    assert c.boot.lookup("/bin/b").ino == c.boot.lookup("/usr/c").ino


def test_hard_link_metadata_comes_from_the_target(tmp_path: Path) -> None:
    layer = make_tar([f("a", b"x", mode=0o600, uid=7), hl("b", "a", mode=0o777, uid=9)])
    t = convert(tmp_path, [layer]).tree()
    assert (t["/b"].mode, t["/b"].uid) == (0o600, 7)


@pytest.mark.parametrize(
    "specs",
    [
        [hl("b", "missing")],
        [f("a", b"x"), hl("b", "../a")],
        [f("a", b"x"), hl("b", "/../a")],
        [d("dir"), hl("b", "dir")],
        [hl("b", ".")],
        [d("real"), f("real/f", b"x"), sym("via", "real"), hl("b", "via/f")],
        [hl("b", "later"), f("later", b"x")],
    ],
    ids=["missing", "dotdot", "abs-dotdot", "directory", "root", "through-symlink", "forward-reference"],
)
def test_bad_hard_links_are_errors(tmp_path: Path, specs: list[object]) -> None:
    with pytest.raises(HardLinkError) as err:
        convert(tmp_path, [make_tar(specs)])  # type: ignore[arg-type]
    assert err.value.layer == 0 and err.value.entry is not None


def test_hard_link_target_whited_out_in_same_layer_is_an_error(tmp_path: Path) -> None:
    lower = make_tar([f("a", b"x")])
    with pytest.raises(HardLinkError):
        convert(tmp_path, [lower, make_tar([wh("a"), hl("b", "a")])])


def test_symlinks_are_data_not_followed(tmp_path: Path) -> None:
    layer = make_tar(
        [
            sym("escape", "../../../../etc/shadow"),
            sym("abs", "/etc/shadow"),
            sym("loop1", "loop2"),
            sym("loop2", "loop1"),
            d("etc"),
            f("etc/shadow", b"image shadow"),
        ]
    )
    c = convert(tmp_path, [layer])
    assert c.boot.readlink(c.boot.lookup("/escape")) == "../../../../etc/shadow"
    # Resolution is chroot-style: '..' stops at the image root, absolute targets start there.
    assert c.content("/escape") == b"image shadow"
    assert c.content("/abs") == b"image shadow"
    from shared.image_format import SymlinkLoopError

    with pytest.raises(SymlinkLoopError):
        c.boot.lookup("/loop1", follow_symlinks=True)
    assert c.boot.lookup("/loop1").is_symlink
    # Nothing was created on the host apart from the conversion output.
    produced = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert all(p == "bootstrap" or p.startswith("blobs") for p in produced), produced


@pytest.mark.parametrize(
    "specs",
    [
        [f("a", b"file"), f("a/b", b"under a file")],
        [d("real"), sym("link", "real"), f("link/x", b"through a symlink")],
        [sym("etc", "/tmp"), f("etc/passwd", b"classic escape")],
        [chr_dev("dev", 1, 3), f("dev/x", b"")],
        [f(".", b"root as a file")],
        [sym("./", "/somewhere")],
    ],
    ids=["file-parent", "symlink-parent", "symlink-escape", "device-parent", "root-file", "root-symlink"],
)
def test_entries_under_a_non_directory_are_rejected(tmp_path: Path, specs: list[object]) -> None:
    with pytest.raises(PathConflictError):
        convert(tmp_path, [make_tar(specs)])  # type: ignore[arg-type]


def test_parent_replaced_by_file_in_lower_layer_then_child_in_upper(tmp_path: Path) -> None:
    lower = make_tar([f("a/b", b"1"), f("a", b"file now")])
    t = convert(tmp_path / "ok", [lower]).tree()
    assert t["/a"].content == b"file now" and "/a/b" not in t
    with pytest.raises(PathConflictError):
        convert(tmp_path / "bad", [lower, make_tar([f("a/c", b"x")])])


def test_aufs_metadata_is_skipped(tmp_path: Path) -> None:
    layer = make_tar([f(".wh..wh.plnk/123.456", b"x"), f(".wh..wh.aufs", b""), f("real", b"r")])
    assert sorted(convert(tmp_path, [layer]).tree()) == ["/", "/real"]


def test_lookup_errors(tmp_path: Path) -> None:
    c = convert(tmp_path, [make_tar([f("file", b"x")])])
    with pytest.raises(NotFoundError) as err:
        c.boot.lookup("/nope")
    assert err.value.errno == 2
    from shared.image_format import NoSuchXattrError, NotASymlinkError, NotDirectoryError

    with pytest.raises(NotDirectoryError):
        c.boot.lookup("/file/below")
    with pytest.raises(NotASymlinkError):
        c.boot.readlink(c.boot.lookup("/file"))
    with pytest.raises(NoSuchXattrError):
        c.boot.getxattr(c.boot.lookup("/file"), "user.none")
    with pytest.raises(NotDirectoryError):
        c.boot.readdir(c.boot.lookup("/file"))
