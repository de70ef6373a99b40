"""Manifests and indexes from untrusted bytes, the target manifest and config, and OCI layouts on disk."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from shared.errors import BlobDigestMismatch, InvalidRequest, MalformedMessage, NotFound
from shared.oci import (
    DAMSELFLY_BLOB,
    DAMSELFLY_BOOTSTRAP,
    Descriptor,
    ImageIndex,
    ImageManifest,
    LayoutRef,
    LayoutStore,
    Platform,
    converted_config,
    damselfly_layers,
    encode_manifest,
    parse_manifest,
)
from shared.oci.progress import NULL_TASK

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def desc(data: bytes, media_type: str = GZIP_LAYER, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest(data), "size": len(data), **extra}


def manifest_doc(media_type: str | None = OCI_MANIFEST) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "config": desc(b"{}", "application/vnd.oci.image.config.v1+json"),
        "layers": [desc(b"layer")],
    }
    if media_type:
        doc["mediaType"] = media_type
    return doc


def test_image_manifests_parse_by_field_header_or_shape() -> None:
    for declared, header in ((OCI_MANIFEST, None), (None, DOCKER_MANIFEST + "; charset=utf-8"), (None, None)):
        raw = json.dumps(manifest_doc(declared)).encode()
        m = parse_manifest(raw, header, "x")
        assert isinstance(m, ImageManifest)
        assert m.digest == digest(raw) and m.layers[0].digest == digest(b"layer")
    assert parse_manifest(json.dumps(manifest_doc(None)).encode(), DOCKER_MANIFEST, "x").media_type == DOCKER_MANIFEST


def test_index_selects_platform() -> None:
    entries = [
        desc(b"amd", OCI_MANIFEST, platform={"os": "linux", "architecture": "amd64"}),
        desc(b"arm", OCI_MANIFEST, platform={"os": "linux", "architecture": "arm64", "variant": "v8"}),
        desc(b"att", OCI_MANIFEST, platform={"os": "unknown", "architecture": "unknown"}),
    ]
    index = parse_manifest(json.dumps({"schemaVersion": 2, "manifests": entries}).encode(), DOCKER_LIST, "x")
    assert isinstance(index, ImageIndex)
    assert index.select(Platform.parse("linux/amd64"), "x").digest == digest(b"amd")
    assert index.select(Platform.parse("linux/arm64"), "x").digest == digest(b"arm")
    with pytest.raises(NotFound, match=r"no image for linux/riscv64 \(it has: linux/amd64, linux/arm64/v8"):
        index.select(Platform.parse("linux/riscv64"), "x")


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"not json", MalformedMessage),
        (b"[1, 2]", MalformedMessage),
        (b" " * (4 << 20) + b"{}", MalformedMessage),
        (json.dumps({"schemaVersion": 1, "fsLayers": []}).encode(), InvalidRequest),
        (json.dumps({**manifest_doc(), "layers": "nope"}).encode(), MalformedMessage),
        (json.dumps({**manifest_doc(), "layers": [{**desc(b"l"), "digest": "sha256:x"}]}).encode(), MalformedMessage),
        (json.dumps({**manifest_doc(), "layers": [{**desc(b"l"), "size": -1}]}).encode(), MalformedMessage),
        (json.dumps({**manifest_doc(), "layers": [{**desc(b"l"), "size": True}]}).encode(), MalformedMessage),
        (json.dumps({**manifest_doc(), "config": None}).encode(), MalformedMessage),
        (json.dumps({"mediaType": "application/vnd.example+json", "blobs": []}).encode(), InvalidRequest),
    ],
    ids=["not-json", "not-object", "too-big", "schema1", "layers-not-list", "bad-digest", "negative-size",
         "bool-size", "no-config", "other-type"],
)  # fmt: skip
def test_hostile_manifests_are_refused(raw: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_manifest(raw, None, "x")


def test_target_manifest_and_config() -> None:
    blob = Descriptor(DAMSELFLY_BLOB, digest(b"blob"), 4, {"io.damselfly.image.chunk-size": "4096"})
    boot = Descriptor(DAMSELFLY_BOOTSTRAP, digest(b"boot"), 4)
    source = {
        "created": "2026-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["A=1"], "Cmd": ["run"], "Entrypoint": ["/e"], "WorkingDir": "/w", "User": "1:1"},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:old"]},
        "history": [{"created_by": "old"}],
    }
    raw = converted_config(source, [blob, boot])
    config = json.loads(raw)
    assert config["config"] == source["config"] and config["created"] == source["created"]
    assert config["rootfs"]["diff_ids"] == [blob.digest, boot.digest]
    assert [h["comment"] for h in config["history"]] == ["data blob", "bootstrap"]
    assert source["rootfs"]["diff_ids"] == ["sha256:old"]  # the source dict is left alone
    assert converted_config(source, [blob, boot]) == raw  # deterministic

    config_desc = Descriptor("application/vnd.oci.image.config.v1+json", digest(raw), len(raw))
    manifest = encode_manifest(config_desc, [blob, boot], {"k": "v"})
    parsed = parse_manifest(manifest, None, "t")
    assert isinstance(parsed, ImageManifest) and parsed.annotations == {"k": "v"}
    assert damselfly_layers(parsed.layers, "t") == ([parsed.layers[0]], parsed.layers[1])
    assert parsed.layers[0].annotations == {"io.damselfly.image.chunk-size": "4096"}


def test_damselfly_layers_refuses_other_images() -> None:
    gz = Descriptor(GZIP_LAYER, digest(b"l"), 1)
    boot = Descriptor(DAMSELFLY_BOOTSTRAP, digest(b"b"), 1)
    with pytest.raises(InvalidRequest, match="not a Damselfly image"):
        damselfly_layers([gz], "x")
    with pytest.raises(InvalidRequest, match="last layer"):
        damselfly_layers([boot, Descriptor(DAMSELFLY_BLOB, digest(b"d"), 1)], "x")
    with pytest.raises(InvalidRequest, match="unexpected layer type"):
        damselfly_layers([gz, boot], "x")


# -- layouts ------------------------------------------------------------------------------------------


def test_layout_round_trip_and_tags(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    store = LayoutStore(LayoutRef(root, "one"))
    asyncio.run(store.check_writable())
    assert not root.exists()  # checking writes nothing
    files = {name: tmp_path / name for name in ("config", "layer")}
    files["config"].write_bytes(b'{"os":"linux","architecture":"amd64"}')
    files["layer"].write_bytes(b"layer bytes")
    config = Descriptor("application/vnd.oci.image.config.v1+json", digest(files["config"].read_bytes()), 37)
    layer = Descriptor(GZIP_LAYER, digest(b"layer bytes"), 11)
    assert asyncio.run(store.push_blob(config, files["config"], NULL_TASK))
    assert asyncio.run(store.push_blob(layer, files["layer"], NULL_TASK))
    assert not asyncio.run(store.push_blob(layer, files["layer"], NULL_TASK))  # already there
    manifest = encode_manifest(config, [layer])
    first = asyncio.run(store.push_manifest(manifest, OCI_MANIFEST))
    # Re-tagging replaces the entry; another tag adds one.
    asyncio.run(store.push_manifest(manifest, OCI_MANIFEST))
    asyncio.run(LayoutStore(LayoutRef(root, "two")).push_manifest(manifest, OCI_MANIFEST))
    index = json.loads((root / "index.json").read_text())
    assert [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]] == ["one", "two"]

    image = asyncio.run(LayoutStore(LayoutRef(root, "one")).resolve(Platform("linux", "amd64")))
    assert image.digest == first and image.config["os"] == "linux"
    path = asyncio.run(store.fetch_blob(layer, tmp_path, NULL_TASK))
    assert path == root / "blobs/sha256" / layer.digest.removeprefix("sha256:")

    with pytest.raises(InvalidRequest, match="name one as oci:DIR:TAG"):
        asyncio.run(LayoutStore(LayoutRef(root)).resolve(Platform("linux", "amd64")))
    with pytest.raises(NotFound, match="no such image"):
        asyncio.run(LayoutStore(LayoutRef(root, "three")).resolve(Platform("linux", "amd64")))


def test_layout_refuses_tampered_and_traversing_blobs(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    store = LayoutStore(LayoutRef(root, "t"))
    src = tmp_path / "b"
    src.write_bytes(b"good")
    good = Descriptor(GZIP_LAYER, digest(b"good"), 4)
    asyncio.run(store.push_blob(good, src, NULL_TASK))
    stored = root / "blobs/sha256" / good.digest.removeprefix("sha256:")
    stored.write_bytes(b"evil")
    with pytest.raises(BlobDigestMismatch):
        asyncio.run(store.fetch_blob(good, tmp_path, NULL_TASK))
    stored.write_bytes(b"longer")
    with pytest.raises(BlobDigestMismatch, match="6 bytes"):
        asyncio.run(store.fetch_blob(good, tmp_path, NULL_TASK, verify=False))
    with pytest.raises(MalformedMessage):
        store.blob_path("sha256:../../../etc/passwd")


def test_layout_target_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    store = LayoutStore(LayoutRef(tmp_path, "t"))
    with pytest.raises(InvalidRequest, match="not an OCI layout"):
        asyncio.run(store.check_writable())
    with pytest.raises(InvalidRequest, match="must name a tag"):
        asyncio.run(LayoutStore(LayoutRef(tmp_path / "new", None, digest(b"x"))).check_writable())
