"""`damselfly init containerd|skopeo` end to end: their files drive a real `ctr images pull --hosts-dir` and a
real `skopeo --registries-conf copy` through a peer of a real cluster, from a real docker-registry origin.

"Through the peer" is checked from both ends: the origin never sees the client (every request it logs
comes from the cluster, none from containerd's or skopeo's user agent, and it sends each blob once), and
the peer's cache-store holds every blob of the image, complete.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from services.cli.cluster import ClusterPlan, LocalCluster, plan_cluster
from shared.tasks import task_id_for_digest
from tests.support.cluster import run
from tests.support.containerd import containerd, ctr
from tests.support.plugin import PushedImage
from tests.support.registry import RegistryServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
# containerd's and containers/image's (skopeo's) User-Agent prefixes.
CLIENT_AGENTS = ("containerd/", "containers/", "skopeo/")


def damselfly_init(*args: str) -> subprocess.CompletedProcess[str]:
    """The helper as a user runs it: its own process, the installed CLI."""
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "init", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )


def cluster_plan(workdir: Path, default_origin: str, also_allowed: str | None = None) -> ClusterPlan:
    """One peer whose registry-proxy defaults to ``default_origin``; ``also_allowed`` joins the allow-lists."""
    plan = plan_cluster(workdir, peers=1, origin=default_origin)
    if also_allowed:
        for spec in plan.children:
            if "allowed_registries" in spec.config:
                spec.config["allowed_registries"].append(also_allowed)
    return plan


async def assert_pulled_through_the_peer(plan: ClusterPlan, image: PushedImage, mark: int) -> None:
    """The origin served only the cluster, each blob once; the peer's store holds every blob."""
    origin = image.registry
    records = origin.access_log(since=mark)
    assert records, "the origin saw no request at all"
    clients = [record for record in records if record.user_agent.startswith(CLIENT_AGENTS)]
    assert clients == [], "the client reached the origin directly"
    for blob in image.manifest.blobs:
        assert origin.blob_bytes_served(blob.digest, since=mark) == blob.size, blob.digest
    async with aiohttp.ClientSession() as session:
        for blob in image.manifest.blobs:
            url = f"{plan.peers[0].upload}/api/v1/tasks/{task_id_for_digest(blob.digest)}"
            async with session.get(url) as response:
                assert response.status == 200, f"the peer does not hold {blob.digest}"
                task = await response.json()
            assert task["completed"] and task["content_length"] == blob.size, task


async def test_ctr_pulls_through_a_peer_with_the_hosts_dir_init_containerd_wrote(
    tmp_path: Path, small_image_in_registry: PushedImage
) -> None:
    image = small_image_in_registry
    registry: RegistryServer = image.registry
    # The peer's default upstream is unreachable: only what containerd sends (the header the helper
    # configured, and its ?ns=) can take the requests to this origin.
    plan = cluster_plan(tmp_path / "cluster", "http://127.0.0.1:1", also_allowed=registry.url)
    hosts = tmp_path / "certs.d"
    written = damselfly_init(
        "containerd", "--proxy", plan.peers[0].proxy, "--registry", registry.url, "--config-path", str(hosts)
    )
    assert written.returncode == 0, written.stderr
    hosts_toml = tomllib.loads((hosts / registry.host / "hosts.toml").read_text())
    assert hosts_toml["host"][plan.peers[0].proxy]["header"] == {"X-Dragonfly-Registry": [registry.url]}

    mark = registry.mark()
    cluster = LocalCluster(plan)
    try:
        await cluster.start()
        with containerd(tmp_path / "containerd") as socket:
            pulled = await asyncio.to_thread(ctr, socket, "images", "pull", "--hosts-dir", str(hosts), image.reference)
            assert pulled.returncode == 0, pulled.stderr + pulled.stdout
            listed = await asyncio.to_thread(ctr, socket, "images", "ls", "-q")
            assert image.reference in listed.stdout.split()
            # The image's content is all there and checked: containerd verifies every blob's digest.
            checked = await asyncio.to_thread(ctr, socket, "images", "check", f"name=={image.reference}")
            assert "complete" in checked.stdout, checked.stdout + checked.stderr
        await assert_pulled_through_the_peer(plan, image, mark)
    finally:
        await cluster.stop()


async def test_skopeo_copies_through_a_peer_with_the_registries_conf_init_skopeo_merged(
    tmp_path: Path, small_image_in_registry: PushedImage
) -> None:
    image = small_image_in_registry
    registry: RegistryServer = image.registry
    # skopeo names no origin: the peer's default upstream must be this registry.
    plan = cluster_plan(tmp_path / "cluster", registry.url)
    conf = tmp_path / "registries.conf"
    existing = (
        "# The site's own settings, kept by the helper.\n"
        'unqualified-search-registries = ["docker.io"]\n\n'
        '[[registry]]\nprefix = "quay.io"\nlocation = "quay.io"\nblocked = true\n'
    )
    conf.write_text(existing)
    proxy_host = urlsplit(plan.peers[0].proxy).netloc
    written = damselfly_init(
        "skopeo", "--proxy", plan.peers[0].proxy, "--registry", registry.url, "--config-path", str(conf)
    )
    assert written.returncode == 0, written.stderr
    assert conf.read_text().startswith(existing)

    mark = registry.mark()
    cluster = LocalCluster(plan)
    try:
        await cluster.start()
        layout = tmp_path / "layout"
        # No --src-tls-verify=false: the insecure flags come from the merged registries.conf.
        command = [
            "skopeo",
            "--insecure-policy",
            "--registries-conf",
            str(conf),
            "copy",
            "--quiet",
            f"docker://{image.reference}",
            f"oci:{layout}:copied",
        ]
        copied = await asyncio.to_thread(run, command)
        assert copied.returncode == 0, copied.stderr
        for blob in image.manifest.blobs:
            data = (layout / "blobs" / "sha256" / blob.digest.removeprefix("sha256:")).read_bytes()
            assert "sha256:" + hashlib.sha256(data).hexdigest() == blob.digest
        await assert_pulled_through_the_peer(plan, image, mark)
        # The mirror really is the peer: with the peer's proxy stopped, skopeo falls back to the origin
        # itself, and the origin then sees skopeo.
        proxy = next(child for child in cluster.children if child.spec.name.endswith("registry-proxy"))
        await proxy.stop(10)
        fallback_mark = registry.mark()
        again = await asyncio.to_thread(run, [*command[:-1], f"oci:{tmp_path / 'direct'}:copied"])
        assert again.returncode == 0, again.stderr
        direct = [r for r in registry.access_log(since=fallback_mark) if r.user_agent.startswith(CLIENT_AGENTS)]
        assert direct, f"without the proxy at {proxy_host}, skopeo should have gone to the origin"
    finally:
        await cluster.stop()
