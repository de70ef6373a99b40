"""P2P under failure: corrupt pieces, dead parents, a restarted scheduler, a seed killed mid-blob."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from services.cli.cluster import ClusterPlan, LocalCluster, plan_cluster
from shared.piece_store import PieceStore
from shared.tasks import piece_count, piece_size_for, task_id_for_digest
from tests.support.images import push_python_layer
from tests.support.registry import RegistryServer
from tests.support.throttle import throttled

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def fetch_blob(proxy: str, digest: str, headers: dict[str, str] | None = None) -> bytes:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{proxy}/v2/library/python/blobs/{digest}", headers=headers or {}) as response,
    ):
        assert response.status == 200, await response.text()
        return await response.read()


def node_store(plan: ClusterPlan, node: str) -> PieceStore:
    """A second handle on a node's piece store (the store is made to be shared by processes)."""
    return PieceStore(plan.workdir / node / "pieces", f"sqlite:///{plan.workdir / node / 'pieces' / 'store.db'}")


def child(cluster: LocalCluster, name: str) -> int:
    [process] = [c for c in cluster.children if c.spec.name == name]
    assert process.process is not None
    return process.process.pid


def flip_byte(path: Path, offset: int) -> None:
    """Corrupt one byte in place, then put the file's mtime back as a sneaky writer would."""
    before = os.stat(path)
    with open(path, "r+b") as handle:
        handle.seek(offset)
        original = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([original[0] ^ 0xFF]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.fixture
def python_in_origin(registry: RegistryServer) -> tuple[RegistryServer, bytes, str, int]:
    layer = push_python_layer(registry.host, registry.url)
    return registry, layer.data, layer.digest, layer.size


async def test_a_corrupt_piece_on_a_parent_is_detected_reported_and_fetched_elsewhere(
    tmp_path: Path, python_in_origin: tuple[RegistryServer, bytes, str, int]
) -> None:
    registry, expected, digest, _size = python_in_origin
    plan = plan_cluster(tmp_path / "cluster", peers=2, origin=registry.url)
    cluster = LocalCluster(plan)
    try:
        await cluster.start()
        assert await fetch_blob(plan.peers[0].proxy, digest) == expected
        # Corrupt piece 1 on peer-0's disk, putting its mtime back as a sneaky writer would.
        task_id = task_id_for_digest(digest)
        path, offset, _length = node_store(plan, "peer-0").piece_file_range(task_id, 1)
        flip_byte(path, offset + 100)
        assert await fetch_blob(plan.peers[1].proxy, digest) == expected
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"{plan.scheduler_url}/api/v1/tasks/{task_id}",
                headers={"Authorization": f"Bearer {plan.admin_token}"},
            ) as response,
        ):
            view = await response.json()
        # The parent's serving check sees the file changed (its ctime cannot be put back), re-hashes the
        # piece, drops it and answers 404; the receiver reports it and takes the piece from another parent.
        assert sum(view["failures"].values()) >= 1, json.dumps(view)[:2000]
        piece_one = next(piece for piece in view["pieces"] if piece["number"] == 1)
        assert "peer-0" not in piece_one["holders"] and "peer-1" in piece_one["holders"]
        assert not node_store(plan, "peer-0").has_piece(task_id, 1)
    finally:
        await cluster.stop()


async def test_a_parent_killed_mid_transfer_and_a_restarted_scheduler_still_deliver_correct_bytes(
    tmp_path: Path, python_in_origin: tuple[RegistryServer, bytes, str, int]
) -> None:
    registry, expected, digest, _size = python_in_origin
    plan = plan_cluster(tmp_path / "cluster", peers=3, origin=registry.url)
    cluster = LocalCluster(plan)
    try:
        await cluster.start()
        assert await fetch_blob(plan.peers[0].proxy, digest) == expected
        pulls = [asyncio.create_task(fetch_blob(peer.proxy, digest)) for peer in plan.peers[1:]]
        await asyncio.sleep(0.05)
        os.kill(child(cluster, "peer-0-cache-store"), signal.SIGKILL)
        os.kill(child(cluster, "scheduler"), signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*pulls), 180)
        assert all(result == expected for result in results)
    finally:
        await cluster.stop()


async def test_a_seed_killed_mid_blob_resumes_and_the_origin_sends_at_most_one_extra_copy(
    tmp_path: Path, python_in_origin: tuple[RegistryServer, bytes, str, int]
) -> None:
    registry, expected, digest, size = python_in_origin
    mark = registry.mark()
    # ~20 MB/s: the 51 MB layer takes a few seconds, long enough to kill the seed half way.
    async with throttled(registry.port, 20 * 1024 * 1024) as slow_port:
        origin = f"http://127.0.0.1:{slow_port}"
        plan = plan_cluster(tmp_path / "cluster", peers=1, origin=origin)
        cluster = LocalCluster(plan)
        try:
            await cluster.start()
            pull = asyncio.create_task(fetch_blob(plan.peers[0].proxy, digest, {"X-Dragonfly-Registry": origin}))
            seed_store = node_store(plan, "seed-0")
            task_id = task_id_for_digest(digest)
            for _ in range(600):
                if len(seed_store.held_pieces(task_id) if seed_store.get_task(task_id) else {}) >= 3:
                    break
                await asyncio.sleep(0.05)
            held_before_kill = len(seed_store.held_pieces(task_id))
            assert 3 <= held_before_kill < 13, held_before_kill
            os.kill(child(cluster, "seed-fetcher"), signal.SIGKILL)
            data = await asyncio.wait_for(pull, 240)
            assert hashlib.sha256(data).hexdigest() == digest.removeprefix("sha256:")
            assert data == expected
        finally:
            await cluster.stop()
    served = registry.blob_bytes_served(digest, since=mark)
    assert size <= served <= 2 * size, f"origin sent {served} bytes for a {size}-byte blob"


async def test_a_range_deep_in_a_blob_is_fetched_by_the_seed_before_the_pieces_ahead_of_it(
    tmp_path: Path, python_in_origin: tuple[RegistryServer, bytes, str, int]
) -> None:
    registry, expected, digest, size = python_in_origin
    # 2 MB/s per connection (the seed keeps 4 ranges in flight): the whole 51 MB layer takes ~6 s, so a
    # seed going lowest piece first would make a reader of the last piece wait for all of it.
    async with throttled(registry.port, 2 * 1024 * 1024) as slow_port:
        origin = f"http://127.0.0.1:{slow_port}"
        plan = plan_cluster(tmp_path / "cluster", peers=1, origin=origin)
        cluster = LocalCluster(plan)
        try:
            await cluster.start()
            task_id = task_id_for_digest(digest)
            last = size - 1
            headers = {"X-Dragonfly-Registry": origin, "Range": f"bytes={last - 1000}-{last}"}
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{plan.peers[0].proxy}/v2/library/python/blobs/{digest}", headers=headers) as response,
            ):
                assert response.status == 206
                assert await response.read() == expected[last - 1000 :]
            held = node_store(plan, "seed-0").held_pieces(task_id)
            piece_size = piece_size_for(size)
            last_piece = piece_count(size, piece_size) - 1
            assert last_piece in held
            assert len(held) <= last_piece, "the seed fetched the whole blob before the awaited last piece"
        finally:
            await cluster.stop()


async def test_an_origin_that_cuts_a_range_of_pieces_short_still_gives_the_reader_every_byte(
    tmp_path: Path, registry: RegistryServer
) -> None:
    from shared.tasks import RANGED_PIECE_SIZE
    from tests.support.cluster import local_cluster
    from tests.support.cutting import cutting_origin

    layer = push_python_layer(registry.host, registry.url)
    # Any blob range longer than one small piece is cut after a piece and a half: the seed keeps the
    # piece that arrived whole and fetches the rest piece by piece.
    mark = registry.mark()
    async with (
        cutting_origin(registry.url, cut_after=RANGED_PIECE_SIZE * 3 // 2) as origin,
        local_cluster(tmp_path / "cluster", origin.url, peers=1, prefetch=False) as plan,
    ):
        first, last = 3 * RANGED_PIECE_SIZE + 7, 6 * RANGED_PIECE_SIZE - 1  # pieces 3, 4 and 5
        headers = {"Range": f"bytes={first}-{last}"}
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{plan.peers[0].proxy}/v2/library/python/blobs/{layer.digest}", headers=headers) as r,
        ):
            assert r.status == 206 and await r.read() == layer.data[first : last + 1]
        assert len(origin.cuts) == 1
        task_id = task_id_for_digest(layer.digest)
        assert sorted(node_store(plan, "seed-0").held_pieces(task_id)) == [3, 4, 5]
        # The run's request (the registry sent the forwarder all three pieces; one and a half got through),
        # then pieces 4 and 5 again, one request each.
        gets = registry.requests(f"/blobs/{layer.digest}$", method="GET", since=mark)
        assert len(gets) == 3
        assert registry.blob_bytes_served(layer.digest, since=mark) == 5 * RANGED_PIECE_SIZE
