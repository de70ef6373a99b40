"""P2P distribution end to end: real origin, real cluster, real skopeo through each peer's mirror."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from services.cli.cluster import LocalCluster, plan_cluster
from shared.tasks import piece_size_for
from tests.support.cluster import local_cluster, mirror_registries_conf, run, skopeo_copy_command
from tests.support.containerd import containerd, ctr, hosts_dir
from tests.support.images import image_blobs, push_oci_layout, python_image
from tests.support.registry import RegistryServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def host_of(url: str) -> str:
    return urlsplit(url).netloc


async def test_three_concurrent_pulls_through_three_peers_take_each_blob_from_the_origin_once(
    tmp_path: Path, registry: RegistryServer
) -> None:
    image = python_image()
    push_oci_layout(image.layout, image.tag, registry.host, "library/python:3.11")
    blobs = image_blobs(registry.url, "library/python", "3.11")
    mark = registry.mark()
    async with local_cluster(tmp_path / "cluster", registry.url, peers=3) as plan:
        commands = []
        for index, peer in enumerate(plan.peers):
            conf = mirror_registries_conf(tmp_path / f"registries-{index}.conf", registry.host, host_of(peer.proxy))
            commands.append(
                skopeo_copy_command(f"{registry.host}/library/python:3.11", tmp_path / f"out-{index}", conf)
            )
        results = await asyncio.gather(*(asyncio.to_thread(run, command) for command in commands))
        for result in results:
            assert result.returncode == 0, result.stderr

    for index in range(3):
        layout = tmp_path / f"out-{index}"
        for blob in blobs:
            data = (layout / "blobs" / "sha256" / blob.digest.removeprefix("sha256:")).read_bytes()
            assert "sha256:" + hashlib.sha256(data).hexdigest() == blob.digest
    for blob in blobs:
        served = registry.blob_bytes_served(blob.digest, since=mark)
        assert served == blob.size, f"{blob.digest}: origin sent {served} bytes for a {blob.size}-byte blob"


async def test_range_requests_through_the_proxy_return_the_origins_bytes(
    tmp_path: Path, registry: RegistryServer
) -> None:
    image = python_image()
    push_oci_layout(image.layout, image.tag, registry.host, "library/python:3.11")
    blobs = image_blobs(registry.url, "library/python", "3.11")
    layer = max(blobs, key=lambda blob: blob.size)
    expected = (image.layout / "blobs" / "sha256" / layer.digest.removeprefix("sha256:")).read_bytes()
    rng = random.Random(7)
    piece = piece_size_for(layer.size)  # A range across a piece boundary.
    ranges = [(0, 0), (layer.size - 1, layer.size - 1), (piece - 10, piece + 10), (0, layer.size - 1)]
    ranges += [tuple(sorted((rng.randrange(layer.size), rng.randrange(layer.size)))) for _ in range(196)]
    async with local_cluster(tmp_path / "cluster", registry.url, peers=1) as plan:
        url = f"{plan.peers[0].proxy}/v2/library/python/blobs/{layer.digest}"
        async with aiohttp.ClientSession() as session:
            for first, last in ranges:
                async with session.get(url, headers={"Range": f"bytes={first}-{last}"}) as response:
                    body = await response.read()
                    assert response.status == 206, (first, last, response.status)
                    assert response.headers["Content-Range"] == f"bytes {first}-{last}/{layer.size}"
                    assert body == expected[first : last + 1], (first, last)
            async with session.get(url, headers={"Range": f"bytes={layer.size}-"}) as response:
                assert response.status == 416
            async with session.get(url) as response:
                assert response.status == 200 and await response.read() == expected
            forbidden = {"X-Dragonfly-Registry": "https://evil.example.com"}
            async with session.get(url, headers=forbidden) as response:
                assert response.status == 403
                assert json.loads(await response.read())["error"] == "forbidden"


async def test_containerd_pulls_through_a_peer_and_its_ns_parameter_selects_the_origin(
    tmp_path: Path, registry: RegistryServer
) -> None:
    image = python_image()
    push_oci_layout(image.layout, image.tag, registry.host, "library/python:3.11")
    blobs = image_blobs(registry.url, "library/python", "3.11")
    mark = registry.mark()
    # The peer's default upstream is elsewhere: only containerd's ?ns= can send it to this origin.
    other = "http://127.0.0.1:1"
    plan = plan_cluster(tmp_path / "cluster", peers=1, origin=other)
    for spec in plan.children:
        if spec.name.endswith("registry-proxy"):
            spec.config["allowed_registries"].append(registry.url)
    cluster = LocalCluster(plan)
    try:
        await cluster.start()
        with containerd(tmp_path / "containerd") as socket:
            hosts = hosts_dir(tmp_path / "hosts", registry.host, plan.peers[0].proxy)
            result = await asyncio.to_thread(
                ctr,
                socket,
                "images",
                "pull",
                "--plain-http",
                "--hosts-dir",
                str(hosts),
                f"{registry.host}/library/python:3.11",
            )
            assert result.returncode == 0, result.stderr + result.stdout
            listed = await asyncio.to_thread(ctr, socket, "images", "ls", "-q")
            assert f"{registry.host}/library/python:3.11" in listed.stdout
    finally:
        await cluster.stop()
    proxy_requests = [record for record in registry.access_log(since=mark) if "blobs" in record.path]
    assert proxy_requests, "the blobs must have come from the origin through the peer"
    for blob in blobs:
        assert registry.blob_bytes_served(blob.digest, since=mark) == blob.size
