"""The seed-fetcher's own metrics: back-to-source jobs, the bytes taken from origins, and their latency."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

# A piece-sized range request to an origin: tens of milliseconds nearby, seconds across the internet.
_RANGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class JobOutcome(enum.Enum):
    """How one back-to-source job ended (the bus's ack, nak and term)."""

    COMPLETED = "completed"
    RETRIED = "retried"  # Redelivered later: the origin or NATS failed for now.
    FAILED = "failed"  # Given up: the origin refused or the blob was wrong; waiting peers are told.


@dataclass(frozen=True)
class SeedMetrics:
    """Back-to-source jobs by outcome, bytes and piece ranges fetched from origins."""

    back_to_source: Counter
    origin_bytes: Counter
    origin_range_seconds: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry) -> SeedMetrics:
        """Register the seed-fetcher's metrics on ``registry`` (the service's own)."""
        back_to_source = Counter(
            "damselfly_seed_back_to_source",
            "Back-to-source jobs (one blob each) run, by outcome (completed, retried, failed).",
            ["outcome"],
            registry=registry,
        )
        for outcome in JobOutcome:
            back_to_source.labels(outcome=outcome.value)
        return cls(
            back_to_source=back_to_source,
            origin_bytes=Counter(
                "damselfly_seed_origin_bytes", "Bytes fetched from origins (back to source).", registry=registry
            ),
            origin_range_seconds=Histogram(
                "damselfly_seed_origin_range_seconds",
                "Time to fetch one piece's byte range from the origin, retries included.",
                buckets=_RANGE_BUCKETS,
                registry=registry,
            ),
        )
