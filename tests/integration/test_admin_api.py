"""The scheduler's admin API over real NATS, a real seed-fetcher and a real origin: auth, pages, preheat."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.cli.cluster import write_state_file
from services.piece_scheduler.app import create_app as create_scheduler
from services.piece_scheduler.config import SchedulerConfig
from services.seed_fetcher.app import create_app as create_seed_fetcher
from services.seed_fetcher.config import SeedFetcherConfig
from shared.bus import Bus
from shared.config import NatsSettings
from shared.nats_server import NatsServer
from shared.schemas import PeerInfo, PeerRegistered
from shared.subjects import ALL_STREAMS
from shared.tasks import task_id_for_digest
from tests.support.cluster import local_cluster
from tests.support.images import Manifest, build_small_image, get_manifest, push_oci_layout
from tests.support.registry import RegistryServer
from tests.support.services import running, service_config
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


async def eventually_status(client: httpx.AsyncClient, path: str, status: int, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (await client.get(path)).status_code != status:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{path} never answered {status}")
        await asyncio.sleep(0.05)


@dataclass
class Cluster:
    """A scheduler and a seed-fetcher in-process; the scheduler's client carries no credentials."""

    scheduler: httpx.AsyncClient
    nats_url: str


@asynccontextmanager
async def cluster(
    tmp_path: Path, nats: NatsServer, registry: RegistryServer | None = None, **api: Any
) -> AsyncIterator[Cluster]:
    scheduler_app = create_scheduler(
        service_config(SchedulerConfig, tmp_path / "scheduler", nats.url, api=api or {"token": TOKEN})
    )
    seed_app = create_seed_fetcher(
        service_config(
            SeedFetcherConfig,
            tmp_path / "seed",
            nats.url,
            seed_id="seed-0",
            allowed_registries=[registry.url] if registry else [],
        )
    )
    async with running(seed_app) as seed, running(scheduler_app) as scheduler:
        await eventually_status(seed, "/readyz", 200)
        await eventually_status(scheduler, "/healthz", 200)
        deadline = asyncio.get_running_loop().time() + 15
        while (await scheduler.get("/readyz")).status_code != 200:
            assert asyncio.get_running_loop().time() < deadline, "scheduler never ready"
            await asyncio.sleep(0.05)
        yield Cluster(scheduler, nats.url)


async def follow(client: httpx.AsyncClient, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll a job until it ends."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        response = await client.get(f"/api/v1/jobs/{job_id}", headers=AUTH)
        assert response.status_code == 200, response.text
        job: dict[str, Any] = response.json()
        if job["state"] in ("succeeded", "failed"):
            return job
        assert asyncio.get_running_loop().time() < deadline, f"job still {job['state']}: {job}"
        await asyncio.sleep(0.1)


def small_image(workdir: Path, marker: str) -> Path:
    """A tiny OCI layout whose one layer differs by ``marker``; returns the layout."""
    image = build_small_image(workdir, {"app/marker.txt": marker.encode() * 1000, "app/run": b"#!/bin/sh\n"})
    return image.layout


def put_index(registry: RegistryServer, repo: str, tag: str, entries: list[dict[str, Any]]) -> str:
    """PUT an OCI index into the registry; returns its digest."""
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    request = urllib.request.Request(
        f"{registry.url}/v2/{repo}/manifests/{tag}", data=body, method="PUT", headers={"Content-Type": OCI_INDEX}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return str(response.headers["Docker-Content-Digest"])


def index_entry(manifest: Manifest, os: str, architecture: str, **annotations: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "mediaType": manifest.media_type,
        "digest": manifest.digest,
        "size": len(manifest.raw),
        "platform": {"os": os, "architecture": architecture},
    }
    if annotations:
        entry["annotations"] = annotations
    return entry


async def register_peers(nats_url: str, count: int) -> None:
    bus = Bus(NatsSettings(url=nats_url, connect_timeout=1.0), client_name="test-peers")
    await bus.connect()
    try:
        await bus.ensure_streams(*ALL_STREAMS)
        for index in range(count):
            info = PeerInfo(
                peer_id=f"peer-{index}",
                node_name=f"node-{index}",
                ip="127.0.0.1",
                upload_url=f"http://127.0.0.1:{9000 + index}",
                idc="idc-a",
                location="eu|fr",
                upload_slots=8,
            )
            await bus.publish(PeerRegistered(peer=info))
    finally:
        await bus.close()


# --- auth ------------------------------------------------------------------------------------------


async def test_a_token_guards_reads_and_changes_unless_reads_are_opened(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with cluster(tmp_path / "closed", nats_server) as c:
        missing = await c.scheduler.get("/api/v1/peers")
        assert missing.status_code == 401
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        assert missing.json()["error"] == "unauthorized"
        wrong = await c.scheduler.get("/api/v1/tasks", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403 and wrong.json()["error"] == "forbidden"
        basic = await c.scheduler.get("/api/v1/jobs", headers={"Authorization": "Basic dXNlcjpwdw=="})
        assert basic.status_code == 401
        assert (await c.scheduler.get("/api/v1/peers", headers=AUTH)).status_code == 200
        post = await c.scheduler.post("/api/v1/jobs/preheat", json={"image": "127.0.0.1:1/a:b"})
        assert post.status_code == 401
        post = await c.scheduler.post(
            "/api/v1/jobs/preheat", json={"image": "127.0.0.1:1/a:b"}, headers={"Authorization": "Bearer x"}
        )
        assert post.status_code == 403
        # Health and metrics stay open for probes and Prometheus.
        assert (await c.scheduler.get("/healthz")).status_code == 200
        assert (await c.scheduler.get("/metrics")).status_code == 200

    async with cluster(tmp_path / "open", nats_server, token=TOKEN, open_reads=True) as c:
        assert (await c.scheduler.get("/api/v1/peers")).status_code == 200
        assert (await c.scheduler.get("/api/v1/jobs")).status_code == 200
        post = await c.scheduler.post("/api/v1/jobs/preheat", json={"image": "127.0.0.1:1/a:b"})
        assert post.status_code == 401


async def test_without_a_token_configured_reads_are_open_and_changes_refused(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with cluster(tmp_path, nats_server, open_reads=False) as c:
        assert (await c.scheduler.get("/api/v1/peers")).status_code == 200
        post = await c.scheduler.post("/api/v1/jobs/preheat", json={"image": "127.0.0.1:1/a:b"}, headers=AUTH)
        assert post.status_code == 401
        assert "no admin token configured" in post.json()["message"]


# --- lists -----------------------------------------------------------------------------------------


async def test_peers_are_listed_in_pages_with_total_and_links(tmp_path: Path, nats_server: NatsServer) -> None:
    async with cluster(tmp_path, nats_server) as c:
        await register_peers(c.nats_url, 5)
        deadline = asyncio.get_running_loop().time() + 10
        while len((await c.scheduler.get("/api/v1/peers", headers=AUTH)).json()) < 5:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)

        first = await c.scheduler.get("/api/v1/peers", params={"per_page": 2}, headers=AUTH)
        assert first.status_code == 200
        assert [peer["peer_id"] for peer in first.json()] == ["peer-0", "peer-1"]
        assert first.headers["X-Total-Count"] == "5"
        assert 'rel="next"' in first.headers["Link"] and "page=2" in first.headers["Link"]
        assert 'rel="prev"' not in first.headers["Link"]
        last = await c.scheduler.get("/api/v1/peers", params={"per_page": 2, "page": 3}, headers=AUTH)
        assert [peer["peer_id"] for peer in last.json()] == ["peer-4"]
        assert 'rel="next"' not in last.headers["Link"] and 'rel="prev"' in last.headers["Link"]
        beyond = await c.scheduler.get("/api/v1/peers", params={"per_page": 2, "page": 9}, headers=AUTH)
        assert beyond.status_code == 200 and beyond.json() == []

        peer = first.json()[0]
        assert peer["idc"] == "idc-a" and peer["location"] == "eu|fr" and peer["ip"] == "127.0.0.1"
        assert peer["upload_slots"] == 8 and peer["upload_slots_in_use"] == 0 and peer["pieces_held"] == 0
        assert peer["state"] == "active"
        metrics = (await c.scheduler.get("/metrics")).text
        assert 'damselfly_scheduler_peers{state="active"} 5.0' in metrics
        assert 'damselfly_scheduler_peers{state="left"} 0.0' in metrics

        for params in ({"per_page": 0}, {"page": 0}, {"per_page": 5000}, {"page": "x"}):
            bad = await c.scheduler.get("/api/v1/peers", params=params, headers=AUTH)
            assert bad.status_code == 400, params
            assert bad.json()["error"] in ("malformed", "invalid_request"), bad.json()
        assert (await c.scheduler.get("/api/v1/peers/nobody", headers=AUTH)).status_code == 404
        assert (await c.scheduler.get("/api/v1/tasks/" + "0" * 64, headers=AUTH)).status_code == 404
        assert (await c.scheduler.get("/api/v1/jobs/nope", headers=AUTH)).status_code == 404


async def test_bad_preheat_payloads_are_refused_with_a_reason(tmp_path: Path, nats_server: NatsServer) -> None:
    async with cluster(tmp_path, nats_server) as c:
        cases: list[tuple[Any, str]] = [
            ({}, "image"),
            ({"image": ""}, "image"),
            ({"image": "127.0.0.1:5000/a:b", "colour": "red"}, "colour"),
            ({"image": "not a reference"}, "invalid image reference"),
            ({"image": "oci:/tmp/layout:tag"}, "not a registry reference"),
            ({"image": "127.0.0.1:5000/a:b", "platform": "linux"}, "platform"),
            ({"image": "127.0.0.1:5000/a@sha256:1234"}, "digest"),
            ([1, 2], "body"),
        ]
        for body, reason in cases:
            response = await c.scheduler.post("/api/v1/jobs/preheat", json=body, headers=AUTH)
            assert response.status_code == 400, (body, response.text)
            assert reason in response.json()["message"], (body, response.json())
        not_json = await c.scheduler.post(
            "/api/v1/jobs/preheat", content=b"{nope", headers={**AUTH, "Content-Type": "application/json"}
        )
        assert not_json.status_code == 400
        assert (await c.scheduler.get("/api/v1/jobs", headers=AUTH)).json() == []


# --- preheat ---------------------------------------------------------------------------------------


async def test_preheat_fetches_every_blob_of_an_image_once_and_reports_progress(
    tmp_path: Path, nats_server: NatsServer, registry: RegistryServer
) -> None:
    layout = small_image(tmp_path / "image", "single")
    push_oci_layout(layout, "latest", registry.host, "team/app:v1")
    manifest = get_manifest(registry.url, "team/app", "v1")
    mark = registry.mark()
    async with cluster(tmp_path, nats_server, registry) as c:
        created = await c.scheduler.post(
            "/api/v1/jobs/preheat", json={"image": f"{registry.host}/team/app:v1"}, headers=AUTH
        )
        assert created.status_code == 202, created.text
        job_id = created.json()["job_id"]
        assert created.headers["Location"].endswith(f"/api/v1/jobs/{job_id}")
        job = await follow(c.scheduler, job_id)
        assert job["state"] == "succeeded", job
        assert job["manifests"] == [manifest.digest]
        assert {blob["digest"] for blob in job["blobs"]} == {d.digest for d in manifest.blobs}
        assert job["blobs_available"] == job["blobs_total"] == len(manifest.blobs)
        assert job["bytes_available"] == job["bytes_total"] == sum(d.size for d in manifest.blobs)
        assert job["finished_at"] is not None and job["error"] is None

        for descriptor in manifest.blobs:
            assert registry.blob_bytes_served(descriptor.digest, since=mark) == descriptor.size
            url = f"/api/v1/tasks/{task_id_for_digest(descriptor.digest)}"

            async def available(url: str = url) -> bool:
                # The job counts pieces held; the task turns available when the seed's completion is folded,
                # a moment later.
                return bool((await c.scheduler.get(url, headers=AUTH)).json()["state"] == "available")

            await eventually(available, what=f"task of {descriptor.digest} to be available")
            task = (await c.scheduler.get(url, headers=AUTH)).json()
            assert task["content_length"] == descriptor.size
            assert set(task["peers"]) == {"seed-0"}
            assert task["back_to_source_count"] == task["piece_count"]

        # The same image again: everything is already in the cluster, the origin sends no blob.
        again_mark = registry.mark()
        again = await c.scheduler.post(
            "/api/v1/jobs/preheat", json={"image": f"{registry.host}/team/app:v1"}, headers=AUTH
        )
        second = await follow(c.scheduler, again.json()["job_id"])
        assert second["state"] == "succeeded"
        assert all(registry.blob_bytes_served(d.digest, since=again_mark) == 0 for d in manifest.blobs)

        listed = await c.scheduler.get("/api/v1/jobs", params={"per_page": 1}, headers=AUTH)
        assert listed.headers["X-Total-Count"] == "2"
        assert [job["job_id"] for job in listed.json()] == [second["job_id"]]


async def test_preheat_of_an_oci_index_takes_every_platform_or_the_one_asked_for(
    tmp_path: Path, nats_server: NatsServer, registry: RegistryServer
) -> None:
    push_oci_layout(small_image(tmp_path / "amd64", "amd64"), "latest", registry.host, "team/multi:amd64")
    push_oci_layout(small_image(tmp_path / "arm64", "arm64"), "latest", registry.host, "team/multi:arm64")
    amd64 = get_manifest(registry.url, "team/multi", "amd64")
    arm64 = get_manifest(registry.url, "team/multi", "arm64")
    index_digest = put_index(
        registry,
        "team/multi",
        "v1",
        [
            index_entry(amd64, "linux", "amd64"),
            index_entry(arm64, "linux", "arm64"),
            # A BuildKit attestation: not an image, never preheated.
            index_entry(amd64, "unknown", "unknown", **{"vnd.docker.reference.type": "attestation-manifest"}),
        ],
    )
    reference = f"{registry.host}/team/multi:v1"
    async with cluster(tmp_path, nats_server, registry) as c:
        one = await c.scheduler.post(
            "/api/v1/jobs/preheat", json={"image": reference, "platform": "linux/arm64"}, headers=AUTH
        )
        job = await follow(c.scheduler, one.json()["job_id"])
        assert job["state"] == "succeeded", job
        assert job["manifests"] == [arm64.digest]
        assert {blob["digest"] for blob in job["blobs"]} == {d.digest for d in arm64.blobs}

        every = await c.scheduler.post("/api/v1/jobs/preheat", json={"image": reference}, headers=AUTH)
        job = await follow(c.scheduler, every.json()["job_id"])
        assert job["state"] == "succeeded", job
        assert sorted(job["manifests"]) == sorted([amd64.digest, arm64.digest])
        assert {blob["digest"] for blob in job["blobs"]} == {d.digest for d in (*amd64.blobs, *arm64.blobs)}

        pinned = await c.scheduler.post(
            "/api/v1/jobs/preheat",
            json={"image": f"{registry.host}/team/multi@{index_digest}", "platform": "linux/amd64"},
            headers=AUTH,
        )
        assert (await follow(c.scheduler, pinned.json()["job_id"]))["manifests"] == [amd64.digest]

        absent = await c.scheduler.post(
            "/api/v1/jobs/preheat", json={"image": reference, "platform": "linux/s390x"}, headers=AUTH
        )
        job = await follow(c.scheduler, absent.json()["job_id"])
        assert job["state"] == "failed"
        assert "linux/s390x" in job["error"] and "linux/amd64" in job["error"] and "linux/arm64" in job["error"]


async def test_preheat_failures_end_the_job_with_the_reason(
    tmp_path: Path, nats_server: NatsServer, registry: RegistryServer
) -> None:
    async with cluster(tmp_path, nats_server, registry) as c:
        missing = await c.scheduler.post(
            "/api/v1/jobs/preheat", json={"image": f"{registry.host}/team/none:v1"}, headers=AUTH
        )
        job = await follow(c.scheduler, missing.json()["job_id"])
        assert job["state"] == "failed" and "team/none" in job["error"]

        elsewhere = await c.scheduler.post(
            "/api/v1/jobs/preheat", json={"image": "registry.invalid:5000/team/app:v1"}, headers=AUTH
        )
        job = await follow(c.scheduler, elsewhere.json()["job_id"])
        assert job["state"] == "failed" and "allow-list" in job["error"]
        assert job["blobs"] == [] and job["finished_at"] is not None


# --- the CLI ---------------------------------------------------------------------------------------


def damselfly(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


async def test_the_cli_lists_peers_and_tasks_and_follows_a_preheat_to_its_end(
    tmp_path: Path, registry: RegistryServer
) -> None:
    layout = small_image(tmp_path / "image", "cli")
    push_oci_layout(layout, "latest", registry.host, "team/cli:v1")
    manifest = get_manifest(registry.url, "team/cli", "v1")
    async with local_cluster(tmp_path / "cluster", registry.url, peers=1) as plan:
        state_file = tmp_path / "state.json"
        write_state_file(state_file, plan.state())
        assert stat.S_IMODE(state_file.stat().st_mode) == 0o600  # It holds the admin token.
        by_state = ["--state-file", str(state_file)]

        result = await asyncio.to_thread(damselfly, "preheat", f"{registry.host}/team/cli:v1", *by_state)
        assert result.returncode == 0, result.stderr
        assert "succeeded" in result.stdout and f"{len(manifest.blobs)}/{len(manifest.blobs)} blobs" in result.stdout

        result = await asyncio.to_thread(damselfly, "tasks", "--json", *by_state)
        assert result.returncode == 0, result.stderr
        tasks = {task["digest"]: task for task in json.loads(result.stdout)}
        assert set(tasks) == {d.digest for d in manifest.blobs}
        assert all(task["state"] == "available" for task in tasks.values())
        table = await asyncio.to_thread(damselfly, "tasks", *by_state)
        assert table.returncode == 0 and f"tasks ({len(tasks)} of {len(tasks)})" in table.stdout
        one = await asyncio.to_thread(damselfly, "tasks", task_id_for_digest(manifest.config.digest), *by_state)
        assert one.returncode == 0 and "seed-0" in one.stdout and "available" in one.stdout

        # Scheduler and token given explicitly (as on a machine without the state file).
        explicit = {"DAMSELFLY_SCHEDULER": plan.scheduler_url, "DAMSELFLY_ADMIN_TOKEN": plan.admin_token}
        result = await asyncio.to_thread(damselfly, "peers", "--json", env=explicit)
        assert result.returncode == 0, result.stderr
        peers = {peer["peer_id"]: peer for peer in json.loads(result.stdout)}
        assert set(peers) == {"peer-0", "seed-0"}
        assert peers["seed-0"]["is_seed"] and peers["seed-0"]["pieces_held"] > 0
        table = await asyncio.to_thread(damselfly, "peers", env=explicit)
        assert table.returncode == 0 and "peer-0" in table.stdout and "seed-0" in table.stdout

        # A wrong token, a failing job and an unreachable scheduler: exit 1 and one clear line.
        wrong = await asyncio.to_thread(damselfly, "peers", env={**explicit, "DAMSELFLY_ADMIN_TOKEN": "nope"})
        assert wrong.returncode == 1 and "403" in wrong.stderr and "not valid" in wrong.stderr
        failing = await asyncio.to_thread(damselfly, "preheat", f"{registry.host}/team/missing:v1", *by_state)
        assert failing.returncode == 1 and "failed" in failing.stdout and "team/missing" in failing.stderr
    gone = await asyncio.to_thread(damselfly, "peers", "--scheduler", plan.scheduler_url, "--token", "x")
    assert gone.returncode == 1 and "cannot reach the scheduler" in gone.stderr
