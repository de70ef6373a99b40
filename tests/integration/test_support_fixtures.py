"""The test-support fixtures against real servers: docker-registry, skopeo/umoci images, PostgreSQL."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support.images import (
    OciImage,
    fetch_blob,
    fetch_config,
    get_manifest,
    pull_to_oci_layout,
    push_oci_layout,
    read_layout_manifest,
)
from tests.support.plugin import (
    SMALL_IMAGE_CMD,
    SMALL_IMAGE_FILES,
    PushedImage,
    RegistryFactory,
)
from tests.support.registry import RegistryServer, basic_auth_header, parse_access_line

pytestmark = pytest.mark.integration


def _status(url: str, headers: dict[str, str] | None = None) -> int:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status: int = resp.status
            return status
    except urllib.error.HTTPError as err:
        return err.code


def test_python_image_pushed_byte_for_byte(
    python_image_in_registry: PushedImage, python_image_layout: OciImage
) -> None:
    pushed = python_image_in_registry
    local = read_layout_manifest(python_image_layout)
    # skopeo --preserve-digests: the registry serves the very manifest and blobs of the layout.
    assert pushed.digest == local.digest
    assert pushed.manifest.blob_sizes == local.blob_sizes
    assert len(pushed.manifest.layers) == 2
    assert pushed.image_bytes == 715 + 51_105_638 + 17_684_407  # figures from shared/images/README.md
    puts = pushed.registry.requests(r"/v2/library/python/manifests/3\.11$", method="PUT")
    assert [r.status for r in puts] == [201]


def test_access_log_accounts_exact_blob_bytes(python_image_in_registry: PushedImage) -> None:
    pushed = python_image_in_registry
    reg = pushed.registry
    mark = reg.mark()  # the registry is session-wide: count only this test's requests
    expected: dict[str, tuple[int, int]] = {}
    for blob in pushed.manifest.blobs:
        body = fetch_blob(reg.url, pushed.repo, blob.digest)
        assert len(body) == blob.size
        assert "sha256:" + hashlib.sha256(body).hexdigest() == blob.digest
        start = blob.size // 3
        end = min(blob.size - 1, start + 300_000 - 1)
        part = fetch_blob(reg.url, pushed.repo, blob.digest, byte_range=(start, end))
        assert part == body[start : end + 1]
        expected[blob.digest] = (blob.size, end - start + 1)

    records = reg.access_log(since=mark)
    assert all(r.method == "GET" for r in records), records
    for digest, (size, range_len) in expected.items():
        gets = [r for r in records if r.blob_digest == digest]
        assert [(r.status, r.bytes_sent) for r in gets] == [(200, size), (206, range_len)]
        assert reg.blob_bytes_served(digest, since=mark) == size + range_len
    assert reg.blob_bytes_total(since=mark) == sum(a + b for a, b in expected.values())


def test_aborted_download_logs_only_what_was_written(python_image_in_registry: PushedImage) -> None:
    pushed = python_image_in_registry
    reg = pushed.registry
    big = max(pushed.manifest.layers, key=lambda d: d.size)
    mark = reg.mark()
    req = urllib.request.Request(f"{reg.url}/v2/{pushed.repo}/blobs/{big.digest}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        got = len(resp.read(1 << 20))
    # Closing early makes the registry's write fail; the line then has the bytes it got out, which
    # include what sat in loopback socket buffers but never reached us.
    (rec,) = reg.wait_for_requests(big.digest, since=mark, timeout=10)
    assert rec.status == 200
    assert got <= rec.bytes_sent < big.size
    assert reg.blob_bytes_served(big.digest, since=mark) == rec.bytes_sent


def test_basic_auth_registry(registry_factory: RegistryFactory, small_image: OciImage) -> None:
    creds = ("alice", "wonderland")
    reg = registry_factory(htpasswd=creds)
    assert reg.credentials == creds
    assert _status(reg.url + "/v2/") == 401
    assert _status(reg.url + "/v2/", {"Authorization": basic_auth_header("alice", "wrong")}) == 401
    assert _status(reg.url + "/v2/", {"Authorization": basic_auth_header(*creds)}) == 200

    with pytest.raises(RuntimeError, match="exited"):
        push_oci_layout(small_image.layout, small_image.tag, reg.host, "test/small:v1")
    digest = push_oci_layout(small_image.layout, small_image.tag, reg.host, "test/small:v1", creds=creds)
    assert _status(f"{reg.url}/v2/test/small/manifests/v1") == 401
    assert get_manifest(reg.url, "test/small", "v1", auth=creds).digest == digest
    statuses = {r.status for r in reg.requests(r"^/v2/$")}
    assert statuses == {200, 401}


def test_small_image_round_trip(small_image_in_registry: PushedImage, small_image: OciImage, tmp_path: Path) -> None:
    pushed = small_image_in_registry
    reg = pushed.registry
    assert pushed.manifest.digest == read_layout_manifest(small_image).digest
    config = fetch_config(reg.url, pushed.repo, pushed.tag)
    inner = config["config"]
    assert isinstance(inner, dict)
    assert inner["Cmd"] == list(SMALL_IMAGE_CMD)
    assert "DAMSELFLY_TEST=1" in inner["Env"]

    (layer,) = pushed.manifest.layers
    data = gzip.decompress(fetch_blob(reg.url, pushed.repo, layer.digest))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for name, content in SMALL_IMAGE_FILES.items():
            member = tar.getmember(name)
            extracted = tar.extractfile(member)
            assert extracted is not None and extracted.read() == content
        assert tar.getmember("app/run").mode & 0o777 == 0o755

    pulled = pull_to_oci_layout(reg.host, f"{pushed.repo}:{pushed.tag}", tmp_path / "pulled")
    assert read_layout_manifest(pulled).digest == pushed.digest


def test_registry_restart_and_stop(registry: RegistryServer, small_image: OciImage) -> None:
    push_oci_layout(small_image.layout, small_image.tag, registry.host, "test/small")
    first_pid = registry.pid
    assert first_pid is not None
    port = registry.port
    registry.restart()
    assert registry.port == port and registry.pid not in (None, first_pid)
    with pytest.raises(ProcessLookupError):
        os.kill(first_pid, 0)
    # Storage survives, and the log keeps the first run's requests.
    assert get_manifest(registry.url, "test/small", small_image.tag).layers
    assert registry.requests(r"/manifests/", method="PUT")
    pid = registry.pid
    assert pid is not None
    registry.stop()
    assert registry.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_parse_access_line_edge_cases() -> None:
    line = (
        '127.0.0.1 - bob [29/Nov/2026:18:41:37 +0000] "GET /v2/a/b/blobs/sha256:abcd?x=1 HTTP/1.1" '
        '206 615 "" "agent \\"quoted\\" / 1.0"'
    )
    rec = parse_access_line(line)
    assert rec is not None
    assert (rec.method, rec.path, rec.uri, rec.status, rec.bytes_sent) == (
        "GET",
        "/v2/a/b/blobs/sha256:abcd",
        "/v2/a/b/blobs/sha256:abcd?x=1",
        206,
        615,
    )
    assert rec.user == "bob" and rec.user_agent == 'agent "quoted" / 1.0'
    assert rec.blob_digest == "sha256:abcd" and rec.repository == "a/b"
    assert parse_access_line('time="2026-11-29T18:41:37Z" level=info msg="response completed"') is None
    assert parse_access_line("") is None


def test_postgres_select_1(postgres_url: str) -> None:
    assert postgres_url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()


def test_postgres_fresh_database(postgres_database_url: str) -> None:
    engine = sa.create_engine(postgres_database_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (x int)"))
            conn.execute(sa.text("INSERT INTO t VALUES (1), (2)"))
            assert conn.execute(sa.text("SELECT sum(x) FROM t")).scalar_one() == 3
            assert (
                conn.execute(sa.text("SELECT current_database()")).scalar_one()
                == postgres_database_url.rsplit("/", 1)[1]
            )
    finally:
        engine.dispose()
