"""Per-mount Prometheus metrics, from the stats the agent polls off each daemon."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from services.chunk_fuse.mounts import MountManager

_LABELS = ["mount", "image"]


def _num(stats: dict[str, Any], *path: str) -> float:
    value: Any = stats
    for key in path:
        value = value.get(key, {}) if isinstance(value, dict) else {}
    return float(value) if isinstance(value, int | float) else 0.0


class MountCollector(Collector):
    """Exports what each mount fetched, served from cache and prefetched, and its read latencies.

    The FUSE daemons are processes of their own; the agent polls their stats (``poll_seconds``) and
    this collector turns the last poll into metrics, so the agent's ``/metrics`` covers every mount.
    ``manager`` gives the agent's mount manager, None before its lifespan has started it.
    """

    def __init__(self, manager: Callable[[], MountManager | None]) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        """One sample per mount and metric, from the last poll."""
        manager = self.manager()
        managed = list(manager.mounts.values()) if manager is not None else []
        mounts = GaugeMetricFamily("damselfly_mounts", "Lazy mounts this agent serves.")
        mounts.add_metric([], len(managed))
        yield mounts
        counters = {
            "bytes_fetched": ("Bytes fetched from the network (mirror or origin).", ("backend", "bytes_fetched")),
            "requests": ("HTTP requests sent (mirror or origin).", ("backend", "requests")),
            "mirror_failovers": (
                "Requests the mirror could not serve and the origin got.",
                ("backend", "mirror_failovers"),
            ),
            "chunks_fetched": ("Chunks fetched from the network for reads.", ("reads", "chunks_fetched")),
            "chunks_from_disk": ("Chunks served from the local disk cache.", ("reads", "chunks_from_disk")),
            "chunks_from_memory": ("Chunks served from memory.", ("reads", "chunks_from_memory")),
            "chunks_waited": ("Chunk reads that waited for a fetch already under way.", ("reads", "chunks_waited")),
            "digest_failures": ("Chunks that failed their digest check.", ("reads", "digest_failures")),
            "read_errors": ("Reads answered with an error.", ("reads", "read_errors")),
            "prefetch_chunks_fetched": ("Chunks fetched by prefetch.", ("reads", "prefetch_chunks_fetched")),
            "prefetch_bytes_fetched": ("Blob bytes fetched by prefetch.", ("reads", "prefetch_bytes_fetched")),
        }
        families = {
            name: CounterMetricFamily(f"damselfly_mount_{name}", text, labels=_LABELS)
            for name, (text, _) in counters.items()
        }
        prefetch = {
            key: GaugeMetricFamily(
                f"damselfly_mount_prefetch_{key}", f"Prefetch plan: {key.replace('_', ' ')}.", labels=_LABELS
            )
            for key in ("planned_chunks", "done_chunks", "planned_bytes", "done_bytes")
        }
        latency = HistogramMetricFamily(
            "damselfly_mount_read_latency_seconds", "Latency of FUSE reads.", labels=_LABELS
        )
        for mount in managed:
            labels = [mount.id, mount.image]
            stats = mount.stats
            for name, (_, path) in counters.items():
                families[name].add_metric(labels, _num(stats, *path))
            for key, family in prefetch.items():
                family.add_metric(labels, _num(stats, "prefetch", key))
            histogram = stats.get("reads", {}).get("read_latency_seconds") if stats else None
            if isinstance(histogram, dict) and histogram.get("buckets"):
                buckets = [(str(bound), float(count)) for bound, count in histogram["buckets"]]
                latency.add_metric(labels, buckets, float(histogram.get("sum", 0.0)))
        yield from families.values()
        yield from prefetch.values()
        yield latency
