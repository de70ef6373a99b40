"""``damselfly demo``: the main job on embedded defaults, end to end on this machine.

It starts a real origin (docker-registry) holding the python test image and a local cluster pointed
at it; then every peer pulls the image at the same moment through its own registry mirror, and the
origin's access log shows it sent each blob once.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from rich.console import Console
from rich.table import Table

from services.cli.cluster import LocalCluster, PeerEndpoints, plan_cluster
from services.cli.origin import LocalOrigin
from shared.errors import UpstreamError

# The shared/ folder beside the checkout holds the real test image (see its README).
DEFAULT_IMAGE_LAYOUT = Path(__file__).resolve().parents[3] / "shared" / "images" / "python-3.11"


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs."""

    workdir: Path
    peers: int
    image_layout: Path
    image_tag: str
    keep_running: bool


async def run_demo(settings: DemoSettings, console: Console) -> None:
    """Origin with the image, cluster up, status shown; stops everything unless asked to keep it."""
    if settings.workdir.exists():
        shutil.rmtree(settings.workdir)
    origin = LocalOrigin(settings.workdir / "origin")
    cluster: LocalCluster | None = None
    try:
        started = time.monotonic()
        with console.status("starting the origin registry and pushing the image"):
            await asyncio.to_thread(origin.start)
            reference = await asyncio.to_thread(
                origin.push_layout, settings.image_layout, settings.image_tag, "library/python:3.11"
            )
        console.print(f"origin [bold]{origin.url}[/] holds [bold]{reference}[/] ({time.monotonic() - started:.1f}s)")

        plan = plan_cluster(settings.workdir / "cluster", peers=settings.peers, origin=origin.url)
        cluster = LocalCluster(plan, state_file=settings.workdir / "state.json")
        started = time.monotonic()
        with console.status(f"starting NATS, the scheduler, a seed and {settings.peers} peers"):
            await cluster.start()
        console.print(f"cluster ready in {time.monotonic() - started:.1f}s; state in {settings.workdir / 'state.json'}")
        console.print(await cluster_table(plan.scheduler_url, plan.admin_token, plan.state()))
        await pull_through_every_peer(settings, origin, plan.peers, reference, console)
        if settings.keep_running:
            console.print("running; Ctrl-C to stop")
            await asyncio.Event().wait()
    finally:
        if cluster is not None:
            await cluster.stop()
        origin.stop()


async def pull_through_every_peer(
    settings: DemoSettings, origin: LocalOrigin, peers: list[PeerEndpoints], reference: str, console: Console
) -> None:
    """Every peer pulls the image at the same moment through its own mirror; the origin sends it once."""
    layout = settings.image_layout
    image_bytes = sum(path.stat().st_size for path in (layout / "blobs" / "sha256").iterdir())
    commands = []
    for peer in peers:
        conf = settings.workdir / f"registries-{peer.name}.conf"
        mirror = peer.proxy.removeprefix("http://")
        conf.write_text(
            f'[[registry]]\nprefix = "{origin.host}"\nlocation = "{origin.host}"\ninsecure = true\n'
            f'[[registry.mirror]]\nlocation = "{mirror}"\ninsecure = true\n'
        )
        target = settings.workdir / "pulls" / peer.name
        target.parent.mkdir(parents=True, exist_ok=True)
        commands.append(
            [
                "skopeo",
                "--insecure-policy",
                "--registries-conf",
                str(conf),
                "copy",
                "--quiet",
                "--src-tls-verify=false",
                "--preserve-digests",
                f"docker://{reference}",
                f"oci:{target}:image",
            ]
        )
    before = sum(origin.blob_bytes_served().values())
    started = time.monotonic()
    with console.status(f"{len(peers)} peers pull {reference} at once, each through its own mirror"):
        results = await asyncio.gather(*(asyncio.to_thread(_run, command) for command in commands))
    elapsed = time.monotonic() - started
    failed = [result.stderr.strip() for result in results if result.returncode != 0]
    if failed:
        raise UpstreamError(f"a pull through the mirror failed: {failed[0]}")
    sent = sum(origin.blob_bytes_served().values()) - before
    console.print(
        f"{len(peers)} pulls of {image_bytes / 1e6:.1f} MB done in {elapsed:.1f}s; the origin sent "
        f"{sent / 1e6:.1f} MB ({sent / image_bytes:.2f}x the image; "
        f"per-node mirrors without P2P would send {len(peers)}x)"
    )


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False)


async def cluster_table(scheduler_url: str, admin_token: str, state: dict[str, object]) -> Table:
    """The peers as the scheduler sees them, beside their endpoints."""
    headers = {"Authorization": f"Bearer {admin_token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{scheduler_url}/api/v1/peers", headers=headers) as response,
    ):
        peers = {peer["peer_id"]: peer for peer in await response.json()}
    table = Table(title="Damselfly local cluster")
    for column in ("peer", "state (scheduler)", "registry mirror", "upload / ping", "chunk-fuse agent"):
        table.add_column(column)
    endpoints = state["peers"]
    assert isinstance(endpoints, list)
    for peer in endpoints:
        seen = peers.get(peer["name"], {})
        table.add_row(peer["name"], str(seen.get("state", "unknown")), peer["proxy"], peer["upload"], peer["agent"])
    return table
