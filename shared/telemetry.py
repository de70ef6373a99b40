"""OpenTelemetry tracing, set up once per process, and W3C trace context carried in NATS headers."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

logger = logging.getLogger(__name__)

TRACER_NAME = "damselfly"
# W3C trace context only: it is what Jaeger and every OTel SDK read, and it fits in a NATS header.
_propagator = TraceContextTextMapPropagator()


def setup_tracing(service: str, otlp_endpoint: str | None = None) -> None:
    """Install a tracer provider for this process, exporting over OTLP/HTTP when an endpoint is known.

    A provider that is already installed (a test's in-memory exporter, or a second service started
    in the same process) is kept: OpenTelemetry allows one global provider per process.
    """
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return
    provider = TracerProvider(resource=Resource.create({"service.name": f"damselfly-{service}"}))
    endpoint = otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        traces_url = endpoint.rstrip("/") + "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url)))
        logger.info("exporting traces over OTLP", extra={"endpoint": traces_url})
    trace.set_tracer_provider(provider)
    propagate.set_global_textmap(_propagator)


def tracer() -> trace.Tracer:
    """The project's tracer (looked up each time so a provider installed later is honoured)."""
    return trace.get_tracer(TRACER_NAME)


def inject_trace_headers(headers: MutableMapping[str, str]) -> None:
    """Write the current span's ``traceparent`` (and ``tracestate``) into message headers."""
    _propagator.inject(headers)


def extract_trace_context(headers: Mapping[str, str] | None) -> context.Context:
    """The trace context carried by message headers (an empty context when there is none)."""
    return _propagator.extract(dict(headers or {}))
