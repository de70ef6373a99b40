"""OpenTelemetry tracing, set up once per process, and W3C trace context carried in NATS and HTTP headers."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import SimpleNamespace

import aiohttp
from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

logger = logging.getLogger(__name__)

TRACER_NAME = "damselfly"
# The span attribute naming the service that made a span. The resource's service.name says it too, but
# the resource is per process, and tests (and `damselfly demo`) run several services in one process.
SERVICE_ATTRIBUTE = "damselfly.service"
# W3C trace context only: it is what Jaeger and every OTel SDK read, and it fits in a NATS header.
_propagator = TraceContextTextMapPropagator()
# The service whose code is running: set by a service's lifespan (its tasks inherit it) and per request.
_current_service: ContextVar[str | None] = ContextVar("damselfly_service", default=None)


class ServiceAttributeProcessor(SpanProcessor):
    """Stamps every span with the service running when it started (see :data:`SERVICE_ATTRIBUTE`)."""

    def on_start(self, span: Span, parent_context: context.Context | None = None) -> None:
        """Add the attribute; spans started outside any service get none."""
        service = _current_service.get()
        if service is not None:
            span.set_attribute(SERVICE_ATTRIBUTE, service)


# Providers already given the processor: a provider installed by someone else (a test's) gets it once.
_stamped_providers: set[int] = set()


def _stamp_services(provider: TracerProvider) -> None:
    if id(provider) not in _stamped_providers:
        provider.add_span_processor(ServiceAttributeProcessor())
        _stamped_providers.add(id(provider))


def build_tracer_provider(service: str, otlp_endpoint: str | None = None) -> TracerProvider:
    """A tracer provider for ``service``, exporting over OTLP/HTTP when an endpoint is configured or in the env."""
    provider = TracerProvider(resource=Resource.create({"service.name": f"damselfly-{service}"}))
    _stamp_services(provider)
    endpoint = otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        traces_url = endpoint.rstrip("/") + "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url)))
        logger.info("exporting traces over OTLP", extra={"endpoint": traces_url})
    return provider


def setup_tracing(service: str, otlp_endpoint: str | None = None) -> None:
    """Install a tracer provider for this process, and mark the calling context as ``service``'s.

    Called from a service's lifespan: the tasks the lifespan starts (bus consumers, responders, loops)
    inherit the mark, so their spans carry :data:`SERVICE_ATTRIBUTE`. A provider that is already
    installed (a test's in-memory exporter, or a second service started in the same process) is kept:
    OpenTelemetry allows one global provider per process.
    """
    _current_service.set(service)
    installed = trace.get_tracer_provider()
    if isinstance(installed, TracerProvider):
        _stamp_services(installed)
        return
    trace.set_tracer_provider(build_tracer_provider(service, otlp_endpoint))
    propagate.set_global_textmap(_propagator)


@contextmanager
def service_scope(service: str) -> Iterator[None]:
    """Spans started in the block (and in tasks created there) belong to ``service``."""
    token = _current_service.set(service)
    try:
        yield
    finally:
        _current_service.reset(token)


def tracer() -> trace.Tracer:
    """The project's tracer (looked up each time so a provider installed later is honoured)."""
    return trace.get_tracer(TRACER_NAME)


def inject_trace_headers(headers: MutableMapping[str, str], ctx: context.Context | None = None) -> None:
    """Write the ``traceparent`` (and ``tracestate``) of ``ctx``, by default the current span's, into headers."""
    _propagator.inject(headers, context=ctx)


def extract_trace_context(headers: Mapping[str, str] | None) -> context.Context:
    """The trace context carried by message headers (an empty context when there is none)."""
    return _propagator.extract(dict(headers or {}))


# --- HTTP client spans ---------------------------------------------------------------------------------


async def _on_request_start(
    _session: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestStartParams
) -> None:
    url = params.url
    span = tracer().start_span(
        params.method,
        kind=SpanKind.CLIENT,
        attributes={
            "http.request.method": params.method,
            "server.address": url.host or "",
            "server.port": url.port or 0,
            # Without query or credentials: signed blob URLs carry secrets there.
            "url.full": str(url.with_user(None).with_query(None).with_fragment(None)),
        },
    )
    ctx.span = span
    inject_trace_headers(params.headers, trace.set_span_in_context(span))


async def _on_request_end(
    _session: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestEndParams
) -> None:
    span: trace.Span | None = getattr(ctx, "span", None)
    if span is None:
        return
    status = params.response.status
    span.set_attribute("http.response.status_code", status)
    if status >= 400:
        span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
    span.end()


async def _on_request_exception(
    _session: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestExceptionParams
) -> None:
    span: trace.Span | None = getattr(ctx, "span", None)
    if span is None:
        return
    if not isinstance(params.exception, asyncio.CancelledError):
        span.record_exception(params.exception)
        span.set_status(Status(StatusCode.ERROR, type(params.exception).__name__))
    span.end()


def client_trace_config() -> aiohttp.TraceConfig:
    """For ``aiohttp.ClientSession(trace_configs=[...])``: a client span per request, and its ``traceparent`` sent.

    The span ends when the response headers arrive (aiohttp's request end); the server's span, which
    covers the body too, may end later.
    """
    config = aiohttp.TraceConfig()
    config.on_request_start.append(_on_request_start)
    config.on_request_end.append(_on_request_end)
    config.on_request_exception.append(_on_request_exception)
    return config
