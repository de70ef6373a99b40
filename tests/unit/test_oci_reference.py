"""Image references, platforms and credentials: parsing what users type and what config files hold."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from shared.errors import InvalidRequest
from shared.oci import Credentials, LayoutRef, Platform, RegistryRef, credentials_from_config, parse_reference
from shared.oci.auth import resolve_credentials

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:5000/library/python:3.11", RegistryRef("127.0.0.1:5000", "library/python", "3.11")),
        ("registry.example.com/a/b/c", RegistryRef("registry.example.com", "a/b/c")),
        (f"localhost/app@{DIGEST}", RegistryRef("localhost", "app", None, DIGEST)),
        (f"ghcr.io/o/app:v1@{DIGEST}", RegistryRef("ghcr.io", "o/app", "v1", DIGEST)),
        ("python", RegistryRef("docker.io", "library/python")),
        ("python:3.11-slim", RegistryRef("docker.io", "library/python", "3.11-slim")),
        ("bitnami/redis:7", RegistryRef("docker.io", "bitnami/redis", "7")),
        ("[::1]:5000/x:y", RegistryRef("[::1]:5000", "x", "y")),
    ],
)
def test_registry_references(text: str, expected: RegistryRef) -> None:
    assert parse_reference(text) == expected


def test_registry_reference_details() -> None:
    ref = parse_reference("python")
    assert isinstance(ref, RegistryRef)
    assert ref.api_host == "registry-1.docker.io" and ref.reference == "latest"
    assert str(ref) == "docker.io/library/python:latest"
    pinned = parse_reference(f"h:1/a:t@{DIGEST}")
    assert isinstance(pinned, RegistryRef) and pinned.reference == DIGEST


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("oci:/images/python:3.11", LayoutRef(Path("/images/python"), "3.11")),
        ("oci:relative/dir", LayoutRef(Path("relative/dir"))),
        ("oci:/with:colon/dir", LayoutRef(Path("/with:colon/dir"))),
        (f"oci:/d@{DIGEST}", LayoutRef(Path("/d"), None, DIGEST)),
    ],
)
def test_layout_references(text: str, expected: LayoutRef) -> None:
    assert parse_reference(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "http://host/repo",
        "host:5000/UPPER",
        "host:5000/repo:bad tag",
        "host:5000/repo:-lead",
        "host/repo@md5:abcd",
        "host/repo@sha256:short",
        "oci:",
        "oci::tag",
        "a//b",
    ],
)
def test_malformed_references_are_refused(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_reference(text)


def test_platforms() -> None:
    assert Platform.parse("linux/arm64/v8") == Platform("linux", "arm64", "v8")
    assert Platform.parse("linux/amd64").matches({"os": "linux", "architecture": "amd64", "variant": "v3"})
    assert Platform.parse("linux/arm64/v8").matches({"os": "linux", "architecture": "arm64"})
    assert not Platform.parse("linux/arm/v7").matches({"os": "linux", "architecture": "arm", "variant": "v6"})
    assert not Platform.parse("linux/amd64").matches({"os": "windows", "architecture": "amd64"})
    for bad in ("linux", "linux/", "a/b/c/d"):
        with pytest.raises(InvalidRequest):
            Platform.parse(bad)


def test_credentials_parse_and_hide_the_password() -> None:
    creds = Credentials.parse("bob:pa:ss")
    assert (creds.username, creds.password) == ("bob", "pa:ss")
    assert creds.header == "Basic " + base64.b64encode(b"bob:pa:ss").decode()
    assert "pa:ss" not in repr(creds)
    for bad in ("nocolon", ":nouser"):
        with pytest.raises(InvalidRequest):
            Credentials.parse(bad)


def test_credentials_from_docker_config(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "auths": {
                    "127.0.0.1:5000": {"auth": base64.b64encode(b"alice:s3cret").decode()},
                    "https://ghcr.io": {"username": "carol", "password": "pw"},
                    "https://index.docker.io/v1/": {"auth": base64.b64encode(b"dave:hub").decode()},
                    "broken.example": {"auth": "!!!not base64"},
                }
            }
        )
    )
    files = [tmp_path / "missing.json", config]
    assert credentials_from_config("127.0.0.1:5000", files) == Credentials("alice", "s3cret")
    assert credentials_from_config("ghcr.io", files) == Credentials("carol", "pw")
    assert credentials_from_config("registry-1.docker.io", files) == Credentials("dave", "hub")
    assert credentials_from_config("broken.example", files) is None
    assert credentials_from_config("elsewhere:1", files) is None


def test_explicit_credentials_win(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"auths": {"h:1": {"username": "cfg", "password": "x"}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    assert resolve_credentials("h:1", None) == Credentials("cfg", "x")
    assert resolve_credentials("h:1", "cli:y") == Credentials("cli", "y")
    assert resolve_credentials("other:2", None) is None
