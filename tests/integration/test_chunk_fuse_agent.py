"""The chunk-fuse agent: mounts over HTTP, per-mount metrics, learned prefetch over NATS, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.chunk_fuse import learned
from services.chunk_fuse.app import create_app
from services.chunk_fuse.config import ChunkFuseConfig
from services.chunk_fuse.rundir import is_mounted
from services.chunk_fuse.spawn import fusermount
from shared.bus import Bus
from shared.config import NatsSettings
from shared.nats_server import NatsServer
from tests.integration.test_chunk_fuse import LazyImage, lazy_python
from tests.support.cluster import local_cluster
from tests.support.services import running, service_config
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

__all__ = ["lazy_python"]  # the module-scoped fixture, shared with test_chunk_fuse.py

FILES = [
    "usr/bin/python3.11",
    "usr/lib/x86_64-linux-gnu/libc.so.6",
    "etc/os-release",
    "usr/lib/python3.11/json/__init__.py",
]


def agent_config(tmp_path: Path, nats_url: str, node: str, **values: Any) -> ChunkFuseConfig:
    return service_config(
        ChunkFuseConfig,
        tmp_path / node,
        nats_url,
        node_name=node,
        run_dir=tmp_path / "run",
        cache_dir=tmp_path / node / "cache",
        poll_seconds=0.3,
        **values,
    )


@contextlib.asynccontextmanager
async def agent(config: ChunkFuseConfig) -> AsyncIterator[httpx.AsyncClient]:
    """The agent app in this process (its daemons are real processes, its mounts real FUSE mounts)."""
    async with running(create_app(config)) as client:
        yield client


async def mount_image(
    client: httpx.AsyncClient, reference: str, at: Path, config_body: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``POST /api/v1/mounts`` of ``reference`` at ``at`` (plain-HTTP registry by default); the mount."""
    body = {"backend": {"insecure": True}} if config_body is None else config_body
    response = await client.post("/api/v1/mounts", json={"image": reference, "mountpoint": str(at), "config": body})
    assert response.status_code == 201, response.text
    return dict(response.json())


def read_heads(root: Path) -> None:
    """What a short-lived start-up does: open a few files and read their beginnings."""
    for rel in FILES:
        with open(root / rel, "rb") as handle:
            handle.read(64 << 10)


@contextlib.contextmanager
def cleanup_mounts(*paths: Path) -> Any:
    try:
        yield
    finally:
        for path in paths:
            if is_mounted(path):
                fusermount(path, lazy=True)


@pytest.mark.slow
async def test_mounts_over_http_metrics_and_a_learned_list_that_the_next_node_prefetches(
    lazy_python: LazyImage, tmp_path: Path, nats_server: NatsServer, bus_factory: Callable[[str], Awaitable[Bus]]
) -> None:
    body_config = {"backend": {"insecure": True}, "learned_prefetch": {"record_seconds": 3}}
    first_mnt, second_mnt = tmp_path / "a", tmp_path / "b"
    first_mnt.mkdir()
    second_mnt.mkdir()
    bus = await bus_factory("test")
    with cleanup_mounts(first_mnt, second_mnt):
        # Node A: the image's first cold start anywhere; it records what the start-up reads.
        async with agent(agent_config(tmp_path, nats_server.url, "node-a")) as client:
            response = await client.post(
                "/api/v1/mounts",
                json={"image": lazy_python.reference, "mountpoint": str(first_mnt), "config": body_config},
            )
            assert response.status_code == 201, response.text
            mount = response.json()
            assert mount["learned_prefetch_chunks"] is None
            await asyncio.to_thread(read_heads, first_mnt)

            kv = await learned.bucket(bus.nc)

            async def published() -> learned.LearnedList | None:
                return await learned.load(kv, mount["digest"])

            recorded = await eventually(published, 20, "the learned list to be published")
            assert recorded.recorded_by == "node-a" and recorded.chunks

            listed = (await client.get("/api/v1/mounts")).json()["mounts"]
            assert [m["id"] for m in listed] == [mount["id"]]
            fresh = (await client.get(f"/api/v1/mounts/{mount['id']}")).json()["stats"]
            assert fresh["reads"]["chunks_fetched"] > 0 and fresh["backend"]["bytes_fetched"] > 0
            metrics = (await client.get("/metrics")).text
            labels = f'image="{lazy_python.reference}",mount="{mount["id"]}"'
            for name in (
                "damselfly_mount_bytes_fetched_total",
                "damselfly_mount_chunks_fetched_total",
                "damselfly_mount_chunks_from_disk_total",
                "damselfly_mount_prefetch_done_chunks",
                "damselfly_mount_read_latency_seconds_count",
            ):
                assert f"{name}{{{labels}}}" in metrics, name
            assert "damselfly_mounts 1.0" in metrics

            deleted = await client.delete(f"/api/v1/mounts/{mount['id']}")
            assert deleted.status_code == 200, deleted.text
            assert not is_mounted(first_mnt)
            assert (await client.get("/api/v1/mounts")).json()["mounts"] == []
            assert (await client.delete(f"/api/v1/mounts/{mount['id']}")).status_code == 404

        # Node B, its own empty cache: it prefetches exactly that list, before anything reads.
        async with agent(agent_config(tmp_path, nats_server.url, "node-b")) as client:
            response = await client.post(
                "/api/v1/mounts",
                json={"image": lazy_python.reference, "mountpoint": str(second_mnt), "config": body_config},
            )
            assert response.status_code == 201, response.text
            mount = response.json()
            assert mount["learned_prefetch_chunks"] == len(recorded.chunks)

            async def prefetched() -> dict[str, Any] | None:
                stats = (await client.get(f"/api/v1/mounts/{mount['id']}")).json()["stats"]
                return stats if stats["prefetch"]["state"] == "done" else None

            stats = await eventually(prefetched, 60, "the learned prefetch to finish")
            assert stats["prefetch"]["planned_chunks"] == len(set(recorded.chunks))
            assert stats["reads"]["prefetch_chunks_fetched"] == len(set(recorded.chunks))
            cached = [p for p in (tmp_path / "node-b" / "cache" / "chunks").rglob("*") if p.is_file()]
            assert len(cached) == len(set(recorded.chunks))

            # The same start-up on node B now needs nothing from the network.
            await asyncio.to_thread(read_heads, second_mnt)
            after = (await client.get(f"/api/v1/mounts/{mount['id']}")).json()["stats"]
            assert after["reads"]["chunks_fetched"] == 0
            assert (await client.delete(f"/api/v1/mounts/{mount['id']}")).status_code == 200


async def test_a_restarted_agent_adopts_its_mounts(
    lazy_python: LazyImage, tmp_path: Path, nats_server: NatsServer
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    config = agent_config(tmp_path, nats_server.url, "node-c")
    with cleanup_mounts(mnt):
        async with agent(config) as client:
            mount_id = (await mount_image(client, lazy_python.reference, mnt))["id"]
            bad = await client.post("/api/v1/mounts", json={"image": lazy_python.reference, "mountpoint": str(mnt)})
            assert bad.status_code == 400
        # The agent is gone; its mount is not (mounts outlive the agent, like nydusd's).
        assert is_mounted(mnt)
        assert (mnt / "etc" / "os-release").read_bytes().startswith(b"PRETTY_NAME")
        async with agent(config) as client:
            listed = (await client.get("/api/v1/mounts")).json()["mounts"]
            assert [m["id"] for m in listed] == [mount_id]
            assert (await client.delete(f"/api/v1/mounts/{mount_id}")).status_code == 200
        assert not is_mounted(mnt)


async def test_a_mount_that_cannot_be_made_is_a_clear_error(tmp_path: Path, nats_server: NatsServer) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    async with agent(agent_config(tmp_path, nats_server.url, "node-d")) as client:
        missing = await client.post(
            "/api/v1/mounts",
            json={
                "image": "127.0.0.1:1/none/such:tag",
                "mountpoint": str(mnt),
                "config": {"backend": {"scheme": "http", "retry_limit": 0}},
            },
        )
        assert missing.status_code == 502, missing.text
        assert "none/such" in missing.json()["message"] or "127.0.0.1:1" in missing.json()["message"]
        relative = await client.post("/api/v1/mounts", json={"image": "a/b:c", "mountpoint": "relative/dir"})
        assert relative.status_code == 400
        typo = await client.post(
            "/api/v1/mounts", json={"image": "a/b:c", "mountpoint": str(mnt), "config": {"backend": {"mirorrs": []}}}
        )
        assert typo.status_code == 400
        assert "mirorrs" in typo.json()["message"]
    assert not is_mounted(mnt)


@pytest.mark.slow
async def test_run_through_the_node_agent_takes_its_warm_standby_daemon(lazy_python: LazyImage, tmp_path: Path) -> None:
    registry = lazy_python.registry
    env = {**os.environ, "DAMSELFLY_RUN_DIR": str(tmp_path / "cli-run")}

    def damselfly(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, timeout=300, env=env
        )

    async with local_cluster(tmp_path / "cluster", registry.url, peers=1) as plan:
        node = plan.peers[0].agent
        async with httpx.AsyncClient(base_url=node, timeout=30) as client:

            async def standby_ready() -> dict[str, Any] | None:
                state: dict[str, Any] = (await client.get("/api/v1/mounts")).json()["standby"]
                return state if state["ready"] else None

            first = await eventually(standby_ready, 60, "the agent's standby daemon to finish its imports")
            assert first["enabled"] and first["pid"]

            # `damselfly mount --agent`: the mount is served by the standby that was waiting.
            mountpoint = tmp_path / "mnt"
            mountpoint.mkdir()
            with cleanup_mounts(mountpoint):
                mounted = await asyncio.to_thread(
                    damselfly, "mount", "--agent", node, "--insecure", "--output-json", lazy_python.reference,
                    str(mountpoint),
                )  # fmt: skip
                assert mounted.returncode == 0, mounted.stderr
                description = json.loads(mounted.stdout)
                assert description["pid"] == first["pid"]
                assert description["image_config"]["Env"], description
                assert (mountpoint / "usr" / "bin" / "python3.11").is_file()
                second = await eventually(standby_ready, 60, "the next standby")
                assert second["pid"] != first["pid"]
                await asyncio.to_thread(read_heads, mountpoint)
                deleted = await client.delete(f"/api/v1/mounts/{description['id']}")
                assert deleted.status_code == 200 and not is_mounted(mountpoint)

            # That mount was the image's first cold start and ended inside its recording window: what it
            # read was published at the unmount, for the next node to prefetch.
            bus = Bus(NatsSettings(url=plan.nats_url, connect_timeout=2.0), client_name="test-learned")
            await bus.connect()
            try:
                kv = await learned.bucket(bus.nc)

                async def published() -> learned.LearnedList | None:
                    return await learned.load(kv, description["digest"])

                recorded = await eventually(published, 20, "the learned list published at the unmount")
                assert recorded.recorded_by == "peer-0" and recorded.chunks
            finally:
                await bus.close()

            # `damselfly run --agent`: the command's output, the mount gone afterwards, a standby again.
            await eventually(standby_ready, 60, "a standby before the run")
            config = tmp_path / "run.json"
            config.write_text(json.dumps({"cache": {"work_dir": str(tmp_path / "run-cache")}}))
            ran = await asyncio.to_thread(
                damselfly, "run", "--agent", node, "--insecure", "--config", str(config), lazy_python.reference,
                "--", "sh", "-c", "python3 -V; exit 3",
            )  # fmt: skip
            assert (ran.returncode, ran.stdout.startswith("Python 3.11")) == (3, True), ran.stderr
            assert (await client.get("/api/v1/mounts")).json()["mounts"] == []
            assert not list((tmp_path / "cli-run" / "run").iterdir())
            assert (tmp_path / "run-cache").is_dir()  # The config's chunk cache, not the node's.
            await eventually(standby_ready, 60, "a standby after the run")

            # The agent validates the config it is sent: a typo is the caller's error, named.
            config.write_text(json.dumps({"cache": {"wrok_dir": "/tmp/x"}}))
            bad = await asyncio.to_thread(
                damselfly, "run", "--agent", node, "--config", str(config), lazy_python.reference, "--", "true"
            )
            assert bad.returncode == 1 and "wrok_dir" in bad.stderr, bad.stderr


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_an_image_stays_mounted_for_the_next_mount_of_it_until_unused_for_the_keep_period(
    lazy_python: LazyImage, tmp_path: Path, nats_server: NatsServer
) -> None:
    first, second, other = tmp_path / "first", tmp_path / "second", tmp_path / "other"
    for path in (first, second, other):
        path.mkdir()
    body = {"backend": {"insecure": True}}
    config = agent_config(tmp_path, nats_server.url, "node-k", keep_mounts_seconds=2.0)
    with cleanup_mounts(first, second, other):
        async with agent(config) as client:
            one = await mount_image(client, lazy_python.reference, first, body)
            two = await mount_image(client, lazy_python.reference, second, body)
            # Both show the one kept mount: one daemon, nothing started for the second.
            assert one["pid"] == two["pid"] and one["id"] != two["id"] and one["shared"] and two["shared"]
            assert (first / "etc" / "os-release").read_bytes() == (second / "etc" / "os-release").read_bytes()
            listing = (await client.get("/api/v1/mounts")).json()
            assert [(k["pid"], k["in_use"]) for k in listing["kept"]] == [(one["pid"], 2)]
            # What the kept daemon decoded is in its memory until told to forget it (drop_caches cannot).
            dropped = (await client.post("/api/v1/caches/drop")).json()["dropped_chunks"]
            assert dropped >= 1
            assert (await client.post("/api/v1/caches/drop")).json()["dropped_chunks"] == 0
            # Another config is another mount.
            other_cache = {**body, "cache": {"work_dir": str(tmp_path / "other-cache")}}
            three = await mount_image(client, lazy_python.reference, other, other_cache)
            assert three["pid"] != one["pid"]

            for mount_id in (one["id"], two["id"], three["id"]):
                assert (await client.delete(f"/api/v1/mounts/{mount_id}")).status_code == 200
            assert not any(is_mounted(path) for path in (first, second, other))
            assert (await client.get("/api/v1/mounts")).json()["mounts"] == []
            # Unused but kept: the next mount of the image within the period is the same daemon again.
            assert pid_alive(one["pid"])
            again = await mount_image(client, lazy_python.reference, first, body)
            assert again["pid"] == one["pid"]
            assert (first / "etc" / "os-release").read_bytes().startswith(b"PRETTY_NAME")
            # A bind taken off from outside is noticed, and the kept mount loses that user.
            await asyncio.to_thread(fusermount, first, lazy=True)

            async def noticed() -> bool:
                listing = (await client.get("/api/v1/mounts")).json()
                # (A kept mount with no user may already have ended: the keep period here is 2 s.)
                return not listing["mounts"] and all(k["in_use"] == 0 for k in listing["kept"])

            await eventually(noticed, 10, "the agent to notice the bind taken off")
            assert (await client.delete(f"/api/v1/mounts/{again['id']}")).status_code == 404

            async def gone() -> bool:
                kept = (await client.get("/api/v1/mounts")).json()["kept"]
                return not kept and not pid_alive(one["pid"]) and not pid_alive(three["pid"])

            await eventually(gone, 20, "the kept mounts to end after the keep period")


async def test_with_no_keep_period_an_unmount_ends_the_daemon(
    lazy_python: LazyImage, tmp_path: Path, nats_server: NatsServer
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    config = agent_config(tmp_path, nats_server.url, "node-n", keep_mounts_seconds=0)
    with cleanup_mounts(mnt):
        async with agent(config) as client:
            mount = await mount_image(client, lazy_python.reference, mnt)
            assert not mount["shared"] and (await client.get("/api/v1/mounts")).json()["kept"] == []
            assert (await client.delete(f"/api/v1/mounts/{mount['id']}")).status_code == 200

            async def ended() -> bool:
                return not pid_alive(mount["pid"])

            await eventually(ended, 20, "the daemon to end")
