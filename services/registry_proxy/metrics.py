"""The registry-proxy's own metrics: what it serves to clients and from where, and how piece downloads go."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# A piece (4 MiB and up) from a parent on the same network takes milliseconds; a busy or distant one seconds.
_PIECE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServedFrom(enum.Enum):
    """Where the bytes a client got came from, as far as this node is concerned.

    ``origin`` is back to source: the proxy relayed the origin directly (a direct proxy rule), or this
    node's request is the one that sent the task to the seed, and the piece came from the seed fetching
    it. Other nodes that get the same pieces meanwhile count them as ``peer``: the origin sent them once.
    So ``origin`` summed over nodes is about what the origin sent, and the rest is traffic saved.
    """

    ORIGIN = "origin"
    PEER = "peer"  # Downloaded over P2P from another node's cache-store (a seed's included).
    LOCAL = "local"  # Already in this node's store when the client asked.


class ParentKind(enum.Enum):
    """What kind of parent a piece was downloaded from."""

    SEED = "seed"
    PEER = "peer"


@dataclass(frozen=True)
class ProxyMetrics:
    """Bytes served by source, piece download latency and failures, downloads in progress."""

    served_bytes: Counter
    piece_download_seconds: Histogram
    piece_failures: Counter
    downloads_in_progress: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> ProxyMetrics:
        """Register the registry-proxy's metrics on ``registry`` (the service's own)."""
        served_bytes = Counter(
            "damselfly_proxy_served_bytes",
            "Blob bytes sent to clients, by where this node got them (origin, peer, local).",
            ["source"],
            registry=registry,
        )
        # Every source is exported from the start, so a ratio over them is defined before any traffic.
        for source in ServedFrom:
            served_bytes.labels(source=source.value)
        return cls(
            served_bytes=served_bytes,
            piece_download_seconds=Histogram(
                "damselfly_proxy_piece_download_seconds",
                "Time to download, verify and store one piece from a parent, by parent kind (seed, peer).",
                ["parent"],
                buckets=_PIECE_BUCKETS,
                registry=registry,
            ),
            piece_failures=Counter(
                "damselfly_proxy_piece_failures",
                "Piece downloads from a parent that failed and were reported, by reason.",
                ["reason"],
                registry=registry,
            ),
            downloads_in_progress=Gauge(
                "damselfly_proxy_downloads_in_progress", "Tasks this node is downloading now.", registry=registry
            ),
        )
