"""Prometheus metrics: one registry per service instance (tests run several services in one process)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# The *_created series double every counter's output and nothing here graphs them.
disable_created_metrics()  # type: ignore[no-untyped-call]

__all__ = ["CONTENT_TYPE_LATEST", "BusMetrics", "HttpMetrics", "ServiceMetrics", "render"]

# Bus and HTTP latencies are mostly sub-millisecond to a few seconds.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class BusMetrics:
    """What the bus does: publishes, deliveries by outcome, handler latency, connection state."""

    published: Counter
    publish_errors: Counter
    delivered: Counter
    handler_seconds: Histogram
    connected: Gauge
    reconnects: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> BusMetrics:
        """Register the bus metrics on ``registry``."""
        return cls(
            published=Counter(
                "damselfly_bus_published", "Messages published to JetStream.", ["subject"], registry=registry
            ),
            publish_errors=Counter(
                "damselfly_bus_publish_errors", "Publishes that failed.", ["subject"], registry=registry
            ),
            delivered=Counter(
                "damselfly_bus_delivered",
                "Messages delivered to a handler, by outcome (ack, nak, term).",
                ["consumer", "outcome"],
                registry=registry,
            ),
            handler_seconds=Histogram(
                "damselfly_bus_handler_seconds",
                "Time spent handling one message.",
                ["consumer"],
                buckets=_LATENCY_BUCKETS,
                registry=registry,
            ),
            connected=Gauge("damselfly_nats_connected", "1 while connected to NATS.", registry=registry),
            reconnects=Counter("damselfly_nats_reconnects", "Reconnections to NATS.", registry=registry),
        )


@dataclass(frozen=True)
class HttpMetrics:
    """HTTP requests served, by route template and status."""

    requests: Counter
    seconds: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry) -> HttpMetrics:
        """Register the HTTP metrics on ``registry``."""
        return cls(
            requests=Counter(
                "damselfly_http_requests",
                "HTTP requests served.",
                ["method", "route", "status"],
                registry=registry,
            ),
            seconds=Histogram(
                "damselfly_http_request_seconds",
                "HTTP request latency until the response starts.",
                ["method", "route"],
                buckets=_LATENCY_BUCKETS,
                registry=registry,
            ),
        )


@dataclass(frozen=True)
class ServiceMetrics:
    """The metrics every service has; services add their own to ``registry``."""

    service: str
    registry: CollectorRegistry
    bus: BusMetrics
    http: HttpMetrics
    up: Gauge

    @classmethod
    def create(cls, service: str) -> ServiceMetrics:
        """A fresh registry with the common metrics."""
        registry = CollectorRegistry()
        up = Gauge("damselfly_service_info", "Constant 1, labelled with the service.", ["service"], registry=registry)
        up.labels(service=service).set(1)
        return cls(
            service=service,
            registry=registry,
            bus=BusMetrics.create(registry),
            http=HttpMetrics.create(registry),
            up=up,
        )


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of ``registry``."""
    return generate_latest(registry)
