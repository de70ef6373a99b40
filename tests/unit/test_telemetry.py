"""Tracing set-up: OTLP export from the environment, the service attribute, and traced HTTP clients."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from shared.telemetry import (
    SERVICE_ATTRIBUTE,
    build_tracer_provider,
    client_trace_config,
    service_scope,
    setup_tracing,
    tracer,
)
from tests.support.http import serving


class _Collector(BaseHTTPRequestHandler):
    received: list[tuple[str, str, bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.received.append((self.path, self.headers.get("Content-Type", ""), body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def otlp_collector() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    """A stand-in OTLP/HTTP collector: records what is posted to it."""
    received: list[tuple[str, str, bytes]] = []
    handler = type("Handler", (_Collector,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def test_spans_are_exported_over_otlp_when_the_environment_names_an_endpoint(
    otlp_collector: tuple[str, list[tuple[str, str, bytes]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, received = otlp_collector
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url + "/")
    provider = build_tracer_provider("unit-test")
    try:
        with service_scope("unit_test"), provider.get_tracer("test").start_as_current_span("exported-span"):
            pass
        assert provider.force_flush(10_000)
    finally:
        provider.shutdown()
    [(path, content_type, body)] = received
    assert path == "/v1/traces" and content_type == "application/x-protobuf"
    # The protobuf carries the resource's service name, the span's name and the service attribute.
    assert b"damselfly-unit-test" in body and b"exported-span" in body and SERVICE_ATTRIBUTE.encode() in body


def test_without_an_endpoint_nothing_is_exported(
    otlp_collector: tuple[str, list[tuple[str, str, bytes]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _url, received = otlp_collector
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    provider = build_tracer_provider("unit-test")
    with provider.get_tracer("test").start_as_current_span("kept-local"):
        pass
    assert provider.force_flush(10_000)
    provider.shutdown()
    assert received == []


def test_spans_name_the_service_whose_scope_they_start_in(span_exporter: InMemorySpanExporter) -> None:
    # As a service's lifespan does; in a copied context, so the mark stays out of other tests.
    contextvars.copy_context().run(setup_tracing, "seed_fetcher")
    tracer().start_span("outside any service").end()
    with service_scope("cache_store"), tracer().start_as_current_span("inner"), service_scope("registry_proxy"):
        tracer().start_span("nested").end()
    spans = {span.name: span for span in span_exporter.get_finished_spans()}
    assert spans["inner"].attributes is not None and spans["inner"].attributes[SERVICE_ATTRIBUTE] == "cache_store"
    assert spans["nested"].attributes is not None and spans["nested"].attributes[SERVICE_ATTRIBUTE] == "registry_proxy"
    assert SERVICE_ATTRIBUTE not in (spans["outside any service"].attributes or {})


async def test_a_traced_client_session_sends_traceparent_of_its_client_span(
    span_exporter: InMemorySpanExporter,
) -> None:
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("traceparent"))
        return web.Response(status=404 if request.path == "/missing" else 200, text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    async with serving(app) as port, aiohttp.ClientSession(trace_configs=[client_trace_config()]) as session:
        with tracer().start_as_current_span("caller") as caller:
            async with session.get(f"http://user:pw@127.0.0.1:{port}/pieces/1?X-Amz-Signature=secret") as ok:
                assert ok.status == 200
            async with session.get(f"http://127.0.0.1:{port}/missing") as missing:
                assert missing.status == 404
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get("http://127.0.0.1:1/refused")

    clients = [span for span in span_exporter.get_finished_spans() if span.kind is SpanKind.CLIENT]
    assert len(clients) == 3
    first, second, refused = clients
    trace_id = caller.get_span_context().trace_id
    for span, header in zip((first, second), seen, strict=True):
        assert span.parent is not None and span.parent.span_id == caller.get_span_context().span_id
        assert span.context.trace_id == trace_id
        # The server is told this client span is its parent.
        assert header is not None and header.startswith(f"00-{trace_id:032x}-{span.context.span_id:016x}-")
    assert first.attributes is not None and first.attributes["http.response.status_code"] == 200
    assert first.attributes["url.full"] == f"http://127.0.0.1:{port}/pieces/1"  # No credentials, no query.
    assert first.status.status_code is StatusCode.UNSET
    assert second.status.status_code is StatusCode.ERROR
    assert refused.status.status_code is StatusCode.ERROR and refused.events[0].name == "exception"
