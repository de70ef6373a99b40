"""Edges of P2P distribution: an empty blob, and `damselfly get` of a plain HTTP URL."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import aiohttp
import pytest

from services.cli.cluster import LocalCluster, plan_cluster
from tests.support.cluster import local_cluster
from tests.support.registry import RegistryServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EMPTY_DIGEST = "sha256:" + hashlib.sha256(b"").hexdigest()


def push_blob(registry: RegistryServer, repository: str, data: bytes) -> str:
    """Upload one blob with the distribution API (POST, then PUT with its digest)."""
    import urllib.request

    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    start = urllib.request.Request(f"{registry.url}/v2/{repository}/blobs/uploads/", method="POST")
    with urllib.request.urlopen(start) as response:
        location = response.headers["Location"]
    separator = "&" if "?" in location else "?"
    url = location if location.startswith("http") else f"{registry.url}{location}"
    finish = urllib.request.Request(f"{url}{separator}digest={digest}", data=data, method="PUT")
    with urllib.request.urlopen(finish) as response:
        assert response.status == 201
    return digest


async def test_an_empty_blob_is_served_and_ranges_on_it_are_416(tmp_path: Path, registry: RegistryServer) -> None:
    assert push_blob(registry, "test/empty", b"") == EMPTY_DIGEST
    async with local_cluster(tmp_path / "cluster", registry.url, peers=1) as plan, aiohttp.ClientSession() as session:
        url = f"{plan.peers[0].proxy}/v2/test/empty/blobs/{EMPTY_DIGEST}"
        async with session.get(url) as response:
            assert response.status == 200 and await response.read() == b""
            assert response.headers["Content-Length"] == "0"
        async with session.get(url, headers={"Range": "bytes=0-0"}) as response:
            assert response.status == 416
        async with session.head(url) as response:
            assert response.status == 200 and response.headers["Content-Length"] == "0"


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """A plain HTTP server with one 9 MiB file (nine pieces)."""
    root = tmp_path / "www"
    root.mkdir()
    data = bytes(range(256)) * (9 * 4096) + b"tail"
    (root / "big.bin").write_bytes(data)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", data
    finally:
        server.shutdown()
        server.server_close()


async def test_damselfly_get_downloads_any_allowed_url_through_the_node(
    tmp_path: Path, file_server: tuple[str, bytes]
) -> None:
    base, data = file_server
    plan = plan_cluster(tmp_path / "cluster", peers=1, origin=base)
    cluster = LocalCluster(plan)
    try:
        await cluster.start()
        output = tmp_path / "out" / "big.bin"
        command = [
            sys.executable,
            "-m",
            "services.cli",
            "get",
            f"{base}/big.bin?Expires=1&Signature=x",
            "-O",
            str(output),
            "--node",
            plan.peers[0].proxy,
            "--output-json",
        ]
        result = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["bytes"] == len(data) and output.read_bytes() == data
        # The same file behind another signature is the same task (Expires and Signature are filtered).
        again = await asyncio.to_thread(
            subprocess.run,
            [*command[:4], f"{base}/big.bin?Signature=y&Expires=2", *command[5:]],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert json.loads(again.stdout)["task_id"] == report["task_id"]
        refused = await asyncio.to_thread(
            subprocess.run,
            [*command[:4], "http://127.0.0.1:9/elsewhere", *command[5:]],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert refused.returncode == 1 and "allow-list" in refused.stderr
        assert not (tmp_path / "out" / "big.bin.damselfly-partial").exists()
    finally:
        await cluster.stop()


async def test_without_prefetch_a_node_and_the_seed_fetch_only_the_pieces_readers_ask_for(
    tmp_path: Path, registry: RegistryServer
) -> None:
    from shared.piece_store import PieceStore
    from shared.tasks import RANGED_PIECE_SIZE, task_id_for_digest
    from tests.support.images import push_python_layer

    layer = push_python_layer(registry.host, registry.url)
    data = layer.data
    mark = registry.mark()
    async with local_cluster(tmp_path / "cluster", registry.url, peers=1, prefetch=False) as plan:
        url = f"{plan.peers[0].proxy}/v2/library/python/blobs/{layer.digest}"
        # The first reader reads ranges: it proposes the small pieces, and the blob is cut in them.
        piece = RANGED_PIECE_SIZE
        async with aiohttp.ClientSession() as session:
            for first in (5 * piece + 10, 9 * piece, 5 * piece + 20):  # the last one is held already
                headers = {"Range": f"bytes={first}-{first + 999}"}
                async with session.get(url, headers=headers) as response:
                    assert response.status == 206 and await response.read() == data[first : first + 1000]
        pieces = plan.workdir / "peer-0" / "pieces"
        store = PieceStore(pieces, f"sqlite:///{pieces / 'store.db'}")
        stored = store.get_task(task_id_for_digest(layer.digest))
        assert stored is not None and stored.piece_size == RANGED_PIECE_SIZE
        assert sorted(store.held_pieces(task_id_for_digest(layer.digest))) == [5, 9]
        # The seed fetched on demand too: the origin sent those two pieces, not the layer.
        assert registry.blob_bytes_served(layer.digest, since=mark) == 2 * piece

        # A client that wants the whole blob turns the on-demand fetch into a full one; each piece still
        # leaves the origin once.
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert response.status == 200 and await response.read() == data
        assert registry.blob_bytes_served(layer.digest, since=mark) == layer.size


async def test_a_range_over_several_small_pieces_leaves_the_origin_as_one_request(
    tmp_path: Path, registry: RegistryServer
) -> None:
    from shared.tasks import RANGED_PIECE_SIZE
    from tests.support.images import push_python_layer

    layer = push_python_layer(registry.host, registry.url)
    mark = registry.mark()
    async with local_cluster(tmp_path / "cluster", registry.url, peers=1, prefetch=False) as plan:
        url = f"{plan.peers[0].proxy}/v2/library/python/blobs/{layer.digest}"
        first = 7 * RANGED_PIECE_SIZE + 100  # pieces 7, 8 and 9
        last = 9 * RANGED_PIECE_SIZE + 5
        headers = {"Range": f"bytes={first}-{last}"}
        async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as r:
            assert r.status == 206 and await r.read() == layer.data[first : last + 1]
        gets = registry.requests(f"/blobs/{layer.digest}$", method="GET", since=mark)
        assert [g.status for g in gets] == [206], "the seed should fetch the three pieces with one range"
        assert registry.blob_bytes_served(layer.digest, since=mark) == 3 * RANGED_PIECE_SIZE


async def test_a_range_reader_after_a_whole_blob_puller_uses_the_registered_layout(
    tmp_path: Path, registry: RegistryServer
) -> None:
    """The first requester decides a task's layout; a range reader that proposed another one renames its
    pieces from the registered layout and gets the right bytes, and the origin sends nothing twice."""
    from shared.piece_store import PieceStore
    from shared.tasks import RANGED_PIECE_SIZE, piece_size_for, task_id_for_digest
    from tests.support.images import push_python_layer

    layer = push_python_layer(registry.host, registry.url)
    data = layer.data
    plan = plan_cluster(tmp_path / "cluster", peers=2, origin=registry.url, prefetch=False)
    cluster = LocalCluster(plan)
    mark = registry.mark()
    try:
        await cluster.start()
        path = f"/v2/library/python/blobs/{layer.digest}"
        async with aiohttp.ClientSession() as session:
            async with session.get(plan.peers[0].proxy + path) as response:
                assert response.status == 200 and await response.read() == data
            # Deep in the blob: under the proposed 256 KiB layout this would be piece 4x+ of a 1 MiB one.
            first = layer.size - 3 * RANGED_PIECE_SIZE - 123
            headers = {"Range": f"bytes={first}-{first + 2 * RANGED_PIECE_SIZE}"}
            async with session.get(plan.peers[1].proxy + path, headers=headers) as response:
                body = await response.read()
                assert response.status == 206, body[:300]
                assert body == data[first : first + 2 * RANGED_PIECE_SIZE + 1]
        pieces = plan.workdir / "peer-1" / "pieces"
        store = PieceStore(pieces, f"sqlite:///{pieces / 'store.db'}")
        stored = store.get_task(task_id_for_digest(layer.digest))
        assert stored is not None and stored.piece_size == piece_size_for(layer.size) != RANGED_PIECE_SIZE
        assert registry.blob_bytes_served(layer.digest, since=mark) == layer.size
    finally:
        await cluster.stop()
