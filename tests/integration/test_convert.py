"""`damselfly convert / check / inspect` against real docker-registry processes and real OCI layouts.

Synthetic images are OCI layouts written here from hand-made tar layers (tests/unit/image_format/helpers),
so every tar feature and every hostile case is exactly what the test says; the python image is the shared
one.  Commands run in-process through typer's runner: an exception that escaped as a traceback would show
up as ``result.exception`` other than SystemExit.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import random
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
import zstandard
from typer.testing import CliRunner, Result

from services.cli.main import app
from tests.support.images import (
    OciImage,
    fetch_blob,
    get_manifest,
    push_oci_layout,
    read_layout_config,
    read_layout_manifest,
)
from tests.support.plugin import PushedImage, RegistryFactory
from tests.support.registry import RegistryServer
from tests.support.token_service import TokenService
from tests.unit.image_format.helpers import Spec, blk_dev, chr_dev, d, f, fifo, hl, make_tar, opq, sym, wh

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHUNK = 4096
BLOB_TYPE = "application/vnd.damselfly.image.blob.v1"
BOOTSTRAP_TYPE = "application/vnd.damselfly.image.bootstrap.v1"
RUNTIME_CONFIG = {
    "Env": ["PATH=/usr/bin:/bin", "GREETING=hello"],
    "Entrypoint": ["/bin/app"],
    "Cmd": ["--serve", "8080"],
    "WorkingDir": "/srv",
    "User": "1000:1000",
    "Labels": {"org.example": "yes"},
}


# -- helpers --------------------------------------------------------------------------------------


def cli(*args: str, env: Mapping[str, str] | None = None) -> Result:
    """Run `damselfly ARGS` in-process; fail the test on an unhandled exception (a traceback)."""
    result = CliRunner().invoke(app, list(args), env=dict(env or {}))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"damselfly {' '.join(args)} raised instead of failing cleanly") from result.exception
    return result


def ok_json(*args: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run a command with --output-json that must succeed; its parsed stdout."""
    result = cli(*args, "--output-json", env=env)
    assert result.exit_code == 0, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    doc: dict[str, Any] = orjson.loads(result.stdout)
    return doc


def one_error_line(result: Result) -> str:
    """The single line a failed command printed on stderr."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def _blob(blobs: Path, data: bytes, media_type: str) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def _layer_bytes(tar: bytes, compression: str) -> tuple[bytes, str]:
    if compression == "gzip":
        return gzip.compress(tar, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip"
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(tar), "application/vnd.oci.image.layer.v1.tar+zstd"
    return tar, "application/vnd.oci.image.layer.v1.tar"


def write_image(
    blobs: Path, layers: Sequence[bytes | tuple[bytes, str]], arch: str = "amd64", raw_layers: bool = False
) -> dict[str, Any]:
    """Write config, layers and manifest blobs; returns the manifest's descriptor.

    A layer is a tar (gzipped) or (tar, compression); with ``raw_layers`` the bytes go in as they are,
    declared as gzip (for broken layers).
    """
    descs, diff_ids = [], []
    for layer in layers:
        tar, compression = layer if isinstance(layer, tuple) else (layer, "gzip")
        data, media_type = (
            (tar, "application/vnd.oci.image.layer.v1.tar+gzip") if raw_layers else _layer_bytes(tar, compression)
        )
        descs.append(_blob(blobs, data, media_type))
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
    config = {
        "architecture": arch,
        "os": "linux",
        "config": RUNTIME_CONFIG,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "test"} for _ in layers],
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": _blob(blobs, json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"),
        "layers": descs,
    }
    return _blob(blobs, json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")


def write_layout(root: Path, layers: Sequence[bytes | tuple[bytes, str]], tag: str = "v1", **kw: Any) -> OciImage:
    """An OCI layout at ``root`` holding one image built from hand-made tar layers."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    desc = write_image(blobs, layers, **kw)
    desc["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    return OciImage(root, tag)


def feature_layers() -> list[bytes | tuple[bytes, str]]:
    """Three layers using every tar feature the format handles, with 4 KiB chunks in mind."""
    rng = random.Random(4)
    one_chunk = rng.randbytes(CHUNK)
    xattrs = {
        "SCHILY.xattr.user.comment": "hello",
        "SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00",
    }
    base: list[Spec] = [
        d("etc"),
        f("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        f("etc/hostname", b"damselfly\n", uid=1000, gid=1000, mode=0o600),
        f("empty"),
        f("one-chunk", one_chunk),
        f("chunk-plus-one", rng.randbytes(CHUNK + 1)),
        f("three-and-a-bit", rng.randbytes(3 * CHUNK + 17)),
        f("zeros", bytes(5 * CHUNK)),
        f("copy-of-one-chunk", one_chunk),
        sym("bin", "usr/bin"),
        d("usr/bin"),
        f("usr/bin/app", b"#!/bin/sh\necho hi\n", mode=0o755),
        f("usr/bin/setuid", b"s", mode=0o4755),
        sym("abs-link", "/etc/passwd"),
        sym("dangling", "../../nowhere"),
        hl("hard-to-passwd", "etc/passwd"),
        hl("hard-to-hostname", "etc/hostname"),
        d("opaque"),
        f("opaque/lower", b"lower"),
        d("gone"),
        f("gone/file", b"x"),
        f("whited", b"w"),
        f("with-xattrs", b"x", pax=xattrs),
        d("dir-with-xattr", pax={"SCHILY.xattr.user.dir": "1"}),
        fifo("fifo"),
        chr_dev("dev/null", 1, 3),
        blk_dev("dev/loop0", 7, 0),
        d("sticky", mode=0o1777),
        f("pax-mtime", b"t", pax={"mtime": "1700000000.123456789"}),
        f("non-utf8-\udcff-name", b"raw bytes name"),
    ]
    upper: list[Spec] = [
        wh("gone"),
        wh("whited"),
        opq("opaque"),
        f("opaque/upper", b"upper"),
        f("etc/passwd", b"root:x:0:0::/root:/bin/bash\n"),  # its hard link keeps the old content
        f("again-one-chunk", one_chunk),  # dedups against the lower layer
        f("deep/auto/created/parents", b"p"),
        d("etc", mode=0o750, uid=0, gid=10),
    ]
    return [
        make_tar(base),
        (make_tar(upper), "none"),
        (make_tar([]), "zstd"),  # a layer with zero files
    ]


def tamper_registry_blob(reg: RegistryServer, digest: str) -> None:
    """Flip bytes of a blob in the registry's own storage, so it serves content that misses its digest."""
    hexpart = digest.removeprefix("sha256:")
    data_file = reg.storage_dir / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"
    data = bytearray(data_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    data_file.write_bytes(bytes(data))


def layer_digests(manifest_layers: Sequence[Any]) -> list[str]:
    """Digests of a manifest's layers (tests.support Descriptor objects)."""
    return [layer.digest for layer in manifest_layers]


# -- the python image -----------------------------------------------------------------------------


def test_python_image_converts_pushes_checks_and_is_reproducible(
    python_image_in_registry: PushedImage, tmp_path: Path
) -> None:
    reg = python_image_in_registry.registry
    source = python_image_in_registry.reference
    target = f"{reg.host}/converted/python:3.11-lazy"
    prefetch = tmp_path / "prefetch.txt"
    prefetch.write_text("# what python needs first\n/usr/bin/python3\n/usr/lib/python3.11/encodings\n")

    report = ok_json(
        "convert", "--source", source, "--target", target, "--source-insecure", "--target-insecure",
        "--prefetch-files", str(prefetch), "--work-dir", str(tmp_path),
    )  # fmt: skip
    assert report["source_digest"] == python_image_in_registry.digest
    assert report["stats"]["files"] > 6000 and report["stats"]["dedup_ratio"] >= 1.0
    assert report["stats"]["prefetch_missing"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prefetch.txt"]  # the work dir is gone

    manifest = get_manifest(reg.url, "converted/python", "3.11-lazy")
    assert manifest.digest == report["target_digest"]
    assert [layer.media_type for layer in manifest.layers] == [BLOB_TYPE, BLOB_TYPE, BOOTSTRAP_TYPE]
    doc = json.loads(manifest.raw)
    assert doc["annotations"]["io.damselfly.image.source.digest"] == python_image_in_registry.digest
    boot_annotations = doc["layers"][-1]["annotations"]
    assert boot_annotations["io.damselfly.image.chunk-size"] == str(1 << 20)
    assert boot_annotations["io.damselfly.image.compressor"] == "zstd"
    assert boot_annotations["io.damselfly.image.digester"] == "blake3"
    assert boot_annotations["io.damselfly.image.format.version"] == "1.0"

    check = ok_json("check", "--source", source, "--target", target, "--source-insecure", "--target-insecure")
    assert check["ok"] and check["differences"] == [] and check["files"] > 6000, check

    inspect = ok_json("inspect", target, "--insecure")
    assert inspect["files"] == report["stats"]["files"]
    assert [b["digest"] for b in inspect["blobs"]] == layer_digests(manifest.layers[:-1])
    assert [p["path"] for p in inspect["prefetch"]] == [
        "/usr/bin/python3.11",  # the symlink resolved to its file
        "/usr/lib/python3.11/encodings",
    ]
    assert inspect["prefetch"][1]["files"] > 100

    # The same image converted again, this time into a local layout: byte-identical bootstrap and blobs.
    again = ok_json(
        "convert", "--source", source, "--target", f"oci:{tmp_path / 'again'}:lazy", "--source-insecure",
        "--prefetch-files", str(prefetch),
    )  # fmt: skip
    assert again["target_digest"] == report["target_digest"]
    assert [b["digest"] for b in again["blobs"]] == layer_digests(manifest.layers)


def test_converted_image_keeps_what_the_runtime_runs(
    python_image_in_registry: PushedImage, python_image_layout: OciImage, tmp_path: Path
) -> None:
    source = python_image_in_registry.reference
    target = f"oci:{tmp_path / 'out'}:lazy"
    ok_json("convert", "--source", source, "--target", target, "--source-insecure", "--chunk-size", "0x10000")
    out = OciImage(tmp_path / "out", "lazy")
    manifest, config = read_layout_manifest(out), read_layout_config(out)
    original = read_layout_config(python_image_layout)
    assert config["config"] == original["config"]  # Env, Cmd, ... exactly as they were
    for key in ("os", "architecture", "created"):
        assert config[key] == original[key]
    assert config["rootfs"] == {"type": "layers", "diff_ids": layer_digests(manifest.layers)}
    assert len(config["history"]) == len(manifest.layers)
    assert json.loads(manifest.raw)["layers"][0]["annotations"]["io.damselfly.image.chunk-size"] == "65536"
    check = ok_json("check", "--source", source, "--target", target, "--source-insecure")
    assert check["ok"], check


# -- synthetic images with every tar feature --------------------------------------------------------


def test_every_tar_feature_converts_and_checks(registry: RegistryServer, tmp_path: Path) -> None:
    image = write_layout(tmp_path / "src", feature_layers())
    push_oci_layout(image.layout, image.tag, registry.host, "test/features:v1")
    source = f"{registry.host}/test/features:v1"
    target = f"{registry.host}/test/features:lazy"
    report = ok_json(
        "convert", "--source", source, "--target", target, "--source-insecure", "--target-insecure",
        "--chunk-size", "4KiB", "--compressor", "lz4", "--digester", "sha256",
    )  # fmt: skip
    # Three layers, three compressions; the empty last layer brings no chunk, so it gets no blob.
    assert [layer["compression"] for layer in report["source_layers"]] == ["gzip", "none", "zstd"]
    assert report["source_layers"][2]["blob"] is None
    # etc/passwd was replaced by the upper layer, so only etc/hostname still has two names.
    assert report["stats"]["hardlinks"] == 1

    check = ok_json("check", "--source", source, "--target", target, "--source-insecure", "--target-insecure")
    assert check["ok"], check["differences"]

    config = json.loads(registry_blob(registry, "test/features", "lazy", config=True))
    for key, value in RUNTIME_CONFIG.items():
        assert config["config"][key] == value

    inspect = ok_json("inspect", target, "--insecure")
    assert inspect["chunk_size"] == CHUNK and inspect["digester"] == "sha256"
    assert inspect["dedup_ratio"] > 1.0  # the copies of one-chunk and the zero chunks
    assert {b["compressor"] for b in inspect["blobs"]} == {"lz4"}


def registry_blob(reg: RegistryServer, repo: str, tag: str, *, config: bool = False) -> bytes:
    """The config (or manifest) bytes of repo:tag."""
    manifest = get_manifest(reg.url, repo, tag)
    return fetch_blob(reg.url, repo, manifest.config.digest) if config else manifest.raw


@pytest.mark.parametrize("chunk", ["4096", "0x10000", "1MiB"])
def test_check_passes_at_every_chunk_size_between_layouts(tmp_path: Path, chunk: str) -> None:
    image = write_layout(tmp_path / "src", feature_layers())
    target = f"oci:{tmp_path / 'out'}:lazy"
    ok_json("convert", "--source", image.ref, "--target", target, "--chunk-size", chunk)
    assert ok_json("check", "--source", image.ref, "--target", target)["ok"]


def test_image_with_zero_files_has_only_a_bootstrap(tmp_path: Path) -> None:
    image = write_layout(tmp_path / "src", [make_tar([d("empty-dir")]), make_tar([])])
    target = f"oci:{tmp_path / 'out'}:lazy"
    report = ok_json("convert", "--source", image.ref, "--target", target)
    assert [b["media_type"] for b in report["blobs"]] == [BOOTSTRAP_TYPE]
    assert ok_json("check", "--source", image.ref, "--target", target)["ok"]
    assert ok_json("inspect", target)["files"] == 0


def test_platform_is_chosen_from_an_index(tmp_path: Path) -> None:
    root = tmp_path / "multi"
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    entries = []
    for arch in ("amd64", "arm64"):
        desc = write_image(blobs, [make_tar([f("arch", arch.encode())])], arch=arch)
        entries.append({**desc, "platform": {"os": "linux", "architecture": arch}})
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}
    index_desc = _blob(blobs, json.dumps(index).encode(), "application/vnd.oci.image.index.v1+json")
    index_desc["annotations"] = {"org.opencontainers.image.ref.name": "multi"}
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [index_desc]}))
    source = f"oci:{root}:multi"

    for arch in ("amd64", "arm64"):
        target = f"oci:{tmp_path / arch}:lazy"
        report = ok_json("convert", "--source", source, "--target", target, "--platform", f"linux/{arch}")
        assert report["source_digest"] == entries[arch == "arm64"]["digest"]
        assert ok_json("check", "--source", source, "--target", target, "--platform", f"linux/{arch}")["ok"]
    result = cli("convert", "--source", source, "--target", f"oci:{tmp_path / 'x'}:y", "--platform", "linux/s390x")
    assert result.exit_code == 1
    assert "no image for linux/s390x (it has: linux/amd64, linux/arm64)" in one_error_line(result)


def test_check_reports_differences_and_exits_1(tmp_path: Path) -> None:
    image = write_layout(tmp_path / "src", [make_tar([f("a", b"one"), f("b", b"two")])])
    other = write_layout(tmp_path / "other", [make_tar([f("a", b"ONE"), f("c", b"two")])])
    target = f"oci:{tmp_path / 'out'}:lazy"
    ok_json("convert", "--source", other.ref, "--target", target)
    result = cli("check", "--source", image.ref, "--target", target)
    assert result.exit_code == 1, result.stdout
    assert "differs: /a: content_sha256" in result.stdout
    assert "differs: /b: presence: expected True, got False" in result.stdout
    assert "differs: /c: presence: expected False, got True" in result.stdout
    assert "problem: the target was converted from" in result.stdout
    doc = orjson.loads(cli("check", "--source", image.ref, "--target", target, "--output-json").stdout)
    assert not doc["ok"] and {d["path"] for d in doc["differences"]} == {"/a", "/b", "/c"}


# -- hostile input ----------------------------------------------------------------------------------


def _truncated() -> bytes:
    whole = gzip.compress(make_tar([f("big", random.Random(1).randbytes(200_000))]), mtime=0)
    return whole[: len(whole) // 2]


HOSTILE = {
    "dotdot-path": ([make_tar([f("placeholder", b"x", pax={"path": "../evil"})])], "contains a '..' component"),
    "absolute-dotdot-path": (
        [make_tar([f("placeholder", b"x", pax={"path": "/../../etc/passwd"})])],
        "contains a '..' component",
    ),
    "hardlink-escape": (
        [make_tar([f("ok", b"x"), hl("escape", "../../etc/shadow")])],
        "hard link target '../../etc/shadow' is unsafe",
    ),
    "write-through-symlink": (
        [make_tar([sym("link", "/etc"), f("link/passwd", b"pwned")])],
        "parent /link is a symlink",
    ),
    "parent-replaced-by-file": (
        [make_tar([f("a", b"file")]), make_tar([f("a/b", b"child")])],
        "parent /a is a reg, not a",
    ),
    "oversized-header": (
        [make_tar([f("x", b"1", pax={"comment": "A" * (2 << 20)})])],
        "exceeds the 1048576-byte limit",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layers_fail_with_one_clear_line(tmp_path: Path, case: str) -> None:
    layers, phrase = HOSTILE[case]
    image = write_layout(tmp_path / "src", layers)
    work = tmp_path / "work"
    work.mkdir()
    result = cli("convert", "--source", image.ref, "--target", f"oci:{tmp_path / 'out'}:x", "--work-dir", str(work))
    assert result.exit_code == 1
    line = one_error_line(result)
    assert phrase in line and "source layer sha256:" in line, line
    assert not list(work.iterdir()) and not (tmp_path / "out").exists()  # nothing left, nothing pushed


@pytest.mark.parametrize(
    ("layer", "phrase"),
    [
        (_truncated(), "truncated"),
        (b"this is not gzip, nor tar, nor zstd" * 40, "not a tar archive"),
    ],
    ids=["truncated-gzip", "not-gzip"],
)
def test_broken_layers_fail_with_one_clear_line(tmp_path: Path, layer: bytes, phrase: str) -> None:
    image = write_layout(tmp_path / "src", [layer], raw_layers=True)
    result = cli("convert", "--source", image.ref, "--target", f"oci:{tmp_path / 'out'}:x")
    assert result.exit_code == 1
    assert phrase in one_error_line(result).lower()


@pytest.mark.parametrize("how", ["corrupted", "swapped"])
def test_blob_digest_mismatch_in_a_layout(tmp_path: Path, how: str) -> None:
    image = write_layout(tmp_path / "src", [make_tar([f("a", random.Random(3).randbytes(20_000))])])
    manifest = json.loads((image.layout / "blobs/sha256" / _index_digest(image)).read_bytes())
    expected = manifest["layers"][0]["digest"]
    layer = image.layout / "blobs/sha256" / expected.removeprefix("sha256:")
    data = bytearray(layer.read_bytes())
    if how == "corrupted":
        data[len(data) // 2] ^= 0xFF  # the converter trips over it: the error must still name the digest
    else:
        # Another valid layer of the same size (gzip allows zero padding): it converts fine, so only the
        # digest can tell.
        other = gzip.compress(make_tar([f("a", b"something else")]), mtime=0)
        data = bytearray(other + bytes(len(data) - len(other)))
    converted = f"oci:{tmp_path / 'converted'}:x"
    ok_json("convert", "--source", image.ref, "--target", converted)  # before the damage
    layer.write_bytes(bytes(data))
    result = cli("convert", "--source", image.ref, "--target", f"oci:{tmp_path / 'out'}:x")
    assert result.exit_code == 1
    line = one_error_line(result)
    assert f"expected digest {expected}" in line, line
    assert not (tmp_path / "out").exists()
    check = cli("check", "--source", image.ref, "--target", converted)
    assert check.exit_code == 2 and f"expected digest {expected}" in one_error_line(check)


def _index_digest(image: OciImage) -> str:
    index = json.loads((image.layout / "index.json").read_text())
    return str(index["manifests"][0]["digest"]).removeprefix("sha256:")


def test_blob_digest_mismatch_from_a_registry(registry: RegistryServer, tmp_path: Path) -> None:
    image = write_layout(tmp_path / "src", [make_tar([f("a", random.Random(2).randbytes(50_000))])])
    push_oci_layout(image.layout, image.tag, registry.host, "test/tampered:v1")
    layer = get_manifest(registry.url, "test/tampered", "v1").layers[0]
    tamper_registry_blob(registry, layer.digest)
    work = tmp_path / "work"
    work.mkdir()
    result = cli(
        "convert", "--source", f"{registry.host}/test/tampered:v1", "--target", f"{registry.host}/test/tampered:lazy",
        "--source-insecure", "--target-insecure", "--work-dir", str(work),
    )  # fmt: skip
    assert result.exit_code == 1
    assert f"blob: expected digest {layer.digest}, got sha256:" in one_error_line(result)
    assert not list(work.iterdir())


def test_a_hostile_layer_in_a_real_process_prints_no_traceback(tmp_path: Path) -> None:
    image = write_layout(tmp_path / "src", HOSTILE["dotdot-path"][0])
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "convert", "--source", image.ref, "--target", f"oci:{tmp_path}/o:x"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr


# -- registry auth ----------------------------------------------------------------------------------


def test_basic_auth_registry_as_source_and_target(
    registry_factory: RegistryFactory, small_image: OciImage, tmp_path: Path
) -> None:
    reg = registry_factory(htpasswd=("alice", "s3cret"))
    push_oci_layout(small_image.layout, small_image.tag, reg.host, "test/small:v1", creds=("alice", "s3cret"))
    source, target = f"{reg.host}/test/small:v1", f"{reg.host}/test/small:lazy"
    flags = ["--source-insecure", "--target-insecure"]

    # Without credentials: one clear line, and before any download (the target is probed first).
    mark = reg.mark()
    result = cli("convert", "--source", source, "--target", target, *flags)
    assert result.exit_code == 1
    assert "requires authentication" in one_error_line(result) and "no credentials were given" in result.stderr
    assert not [r for r in reg.access_log(since=mark) if r.blob_digest and r.method == "GET"]
    wrong = cli("convert", "--source", source, "--target", target, *flags, "--source-creds", "alice:nope",
                "--target-creds", "alice:nope")  # fmt: skip
    assert wrong.exit_code == 1 and "credentials were refused" in one_error_line(wrong)

    creds = ["--source-creds", "alice:s3cret", "--target-creds", "alice:s3cret"]
    report = ok_json("convert", "--source", source, "--target", target, *flags, *creds)
    assert ok_json("check", "--source", source, "--target", target, *flags, *creds)["ok"]
    assert ok_json("inspect", target, "--insecure", "--creds", "alice:s3cret")["files"] == 3

    denied = cli("check", "--source", source, "--target", target, *flags)
    assert denied.exit_code == 2 and "requires authentication" in one_error_line(denied)

    # The usual ~/.docker/config.json auths work too (DOCKER_CONFIG points at another directory).
    docker_config = tmp_path / "docker"
    docker_config.mkdir()
    auth = base64.b64encode(b"alice:s3cret").decode()
    (docker_config / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
    env = {"DOCKER_CONFIG": str(docker_config)}
    again = ok_json("convert", "--source", source, "--target", f"{reg.host}/test/small:lazy2", *flags, env=env)
    assert again["target_digest"] == report["target_digest"]
    assert again["uploaded_blobs"] == 0  # every blob (and the config) was there already: HEAD, no upload


# -- bearer tokens: a real docker-registry with `auth: token`, and a token service of our own ----------


def test_bearer_token_registry_as_source_and_target(
    registry_factory: RegistryFactory, token_service: TokenService, small_image: OciImage
) -> None:
    reg = registry_factory(extra_config=token_service.registry_config())
    push_oci_layout(small_image.layout, small_image.tag, reg.host, "test/small:v1", creds=("alice", "s3cret"))
    source, target = f"{reg.host}/test/small:v1", f"{reg.host}/test/small:lazy"
    flags = [
        "--source-insecure",
        "--target-insecure",
        "--source-creds",
        "alice:s3cret",
        "--target-creds",
        "alice:s3cret",
    ]

    issued_before = len(token_service.issued)
    mark = reg.mark()
    ok_json("convert", "--source", source, "--target", target, *flags)
    assert ok_json("check", "--source", source, "--target", target, *flags)["ok"]
    # One token per repository scope and command, reused by every later request (so no upload body is
    # sent only to be challenged): convert pulls and pushes, check pulls source and target.
    scopes = [a["actions"] for claims in token_service.issued[issued_before:] for a in claims["access"]]
    assert sorted(scopes) == [["pull"], ["pull"], ["pull"], ["pull", "push"]], scopes
    uploads = [r for r in reg.access_log(since=mark) if r.method in ("PUT", "PATCH") and "/uploads/" in r.path]
    assert uploads and all(r.status in (201, 202) for r in uploads)

    denied = cli("convert", "--source", source, "--target", f"{reg.host}/test/small:other",
                 "--source-insecure", "--target-insecure")  # fmt: skip
    assert denied.exit_code == 1 and "requires authentication" in one_error_line(denied)
