"""The agent's /metrics for lazy mounts: the stats a FUSE daemon reports, as Prometheus families."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.chunk_fuse.backend import BackendStats
from services.chunk_fuse.metrics import MountCollector
from services.chunk_fuse.mounts import ManagedMount, MountManager
from services.chunk_fuse.prefetch import PrefetchProgress
from services.chunk_fuse.reader import ReadStats


def daemon_stats() -> dict[str, Any]:
    """What a daemon answers on /api/v1/stats after a few reads, through JSON as the agent polls it."""
    reads, backend, prefetch = ReadStats(), BackendStats(), PrefetchProgress()
    for seconds in (0.00005, 0.002, 0.002, 0.3):
        reads.latency.observe(seconds)
    reads.add(chunks_fetched=3, chunk_bytes_fetched=3 * 4096, chunks_from_disk=5)
    backend.add(bytes_fetched=12_288, via_mirror=True)
    backend.add(bytes_fetched=100, via_mirror=False)
    prefetch.planned_chunks, prefetch.done_chunks = 10, 4
    stats = {"backend": backend.snapshot(), "reads": reads.snapshot(), "prefetch": prefetch.snapshot()}
    loaded: dict[str, Any] = json.loads(json.dumps(stats))
    return loaded


def scrape(registry: CollectorRegistry) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_read_latency_and_bytes_fetched_of_each_mount_are_exported(tmp_path: Path) -> None:
    mount = ManagedMount(
        id="m1",
        image="registry.local/library/python:3.11",
        digest="sha256:" + "0" * 64,
        mountpoint=tmp_path / "mnt",
        pid=1,
        control_socket=tmp_path / "m1.sock",
        created_at=0.0,
        stats=daemon_stats(),
    )
    manager = cast(MountManager, SimpleNamespace(mounts={mount.id: mount}))
    registry = CollectorRegistry()
    registry.register(MountCollector(lambda: manager))

    samples = scrape(registry)
    labels = (("image", mount.image), ("mount", "m1"))
    assert samples["damselfly_mounts"][()] == 1
    assert samples["damselfly_mount_bytes_fetched_total"][labels] == 12_388
    assert samples["damselfly_mount_chunks_fetched_total"][labels] == 3
    assert samples["damselfly_mount_chunks_from_disk_total"][labels] == 5
    assert samples["damselfly_mount_prefetch_planned_chunks"][labels] == 10
    assert samples["damselfly_mount_read_latency_seconds_count"][labels] == 4
    assert abs(samples["damselfly_mount_read_latency_seconds_sum"][labels] - 0.30405) < 1e-9
    buckets = samples["damselfly_mount_read_latency_seconds_bucket"]
    assert buckets[(*labels[:1], ("le", "0.0001"), *labels[1:])] == 1
    assert buckets[(*labels[:1], ("le", "0.0025"), *labels[1:])] == 3
    assert buckets[(*labels[:1], ("le", "+Inf"), *labels[1:])] == 4


def test_before_the_agent_has_started_its_mounts_the_families_are_there_and_empty() -> None:
    registry = CollectorRegistry()
    registry.register(MountCollector(lambda: None))
    samples = scrape(registry)
    assert samples["damselfly_mounts"][()] == 0
    assert "damselfly_mount_bytes_fetched_total" not in samples
