"""The cache-store's own metrics: uploads, slots, the store's size, evictions and corrupt pieces."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge


@dataclass(frozen=True)
class CacheStoreMetrics:
    """What the upload server and the store's janitor count."""

    uploaded_bytes: Counter
    pieces_served: Counter
    uploads_rejected: Counter
    upload_slots_in_use: Gauge
    disk_usage_bytes: Gauge
    tasks_held: Gauge
    evictions: Counter
    corrupt_pieces_dropped: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> CacheStoreMetrics:
        """Register the cache-store metrics on ``registry`` (the service's own)."""
        return cls(
            uploaded_bytes=Counter(
                "damselfly_upload_bytes", "Bytes sent to other peers (pieces and ranges).", registry=registry
            ),
            pieces_served=Counter(
                "damselfly_upload_pieces_served", "Pieces sent in full to other peers.", registry=registry
            ),
            uploads_rejected=Counter(
                "damselfly_upload_rejected", "Uploads refused with 503 because every slot was busy.", registry=registry
            ),
            upload_slots_in_use=Gauge(
                "damselfly_upload_slots_in_use", "Uploads in progress right now.", registry=registry
            ),
            disk_usage_bytes=Gauge(
                "damselfly_cache_disk_usage_bytes", "Bytes of the pieces the store holds.", registry=registry
            ),
            tasks_held=Gauge("damselfly_cache_tasks_held", "Tasks the store holds.", registry=registry),
            evictions=Counter(
                "damselfly_cache_evictions",
                "Tasks evicted by garbage collection (TTL or watermark).",
                registry=registry,
            ),
            corrupt_pieces_dropped=Counter(
                "damselfly_cache_corrupt_pieces_dropped",
                "Pieces found corrupt on disk when about to be served, and forgotten.",
                registry=registry,
            ),
        )
