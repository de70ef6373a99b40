"""A whole local cluster for tests: the same planner and supervisor as `damselfly up`, in the test's loop."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from services.cli.cluster import ClusterPlan, LocalCluster, plan_cluster


@asynccontextmanager
async def local_cluster(
    workdir: Path, origin: str, peers: int = 3, *, prefetch: bool = True
) -> AsyncIterator[ClusterPlan]:
    """NATS, scheduler, seed and ``peers`` peer nodes, all real processes; stopped even on failure.

    ``prefetch=False``: the nodes fetch only what readers ask for, as lazy nodes do."""
    plan = plan_cluster(workdir, peers=peers, origin=origin, prefetch=prefetch)
    cluster = LocalCluster(plan)
    try:
        await cluster.start()
        yield plan
    finally:
        await cluster.stop()


def mirror_registries_conf(path: Path, origin_host: str, mirror_host: str) -> Path:
    """A containers-registries.conf(5) that sends pulls of ``origin_host`` through ``mirror_host``."""
    path.write_text(
        "[[registry]]\n"
        f'prefix = "{origin_host}"\n'
        f'location = "{origin_host}"\n'
        "insecure = true\n"
        "[[registry.mirror]]\n"
        f'location = "{mirror_host}"\n'
        "insecure = true\n"
    )
    return path


def skopeo_copy_command(source: str, destination: Path, registries_conf: Path, tag: str = "image") -> Sequence[str]:
    """skopeo pulling ``docker://source`` into an OCI layout, through the mirrors in ``registries_conf``."""
    return [
        "skopeo",
        "--insecure-policy",
        "--registries-conf",
        str(registries_conf),
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        "--preserve-digests",
        f"docker://{source}",
        f"oci:{destination}:{tag}",
    ]


def run(command: Sequence[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output."""
    return subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, check=False)
