"""What every service has: health, readiness, metrics, error mapping, tracing, and a NATS bus.

A service's ``app.py`` builds its FastAPI app with :func:`create_service_app` and, in its lifespan,
enters :func:`service_runtime` first; everything the service owns hangs off ``app.state``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.bus import Bus
from shared.config import ServiceConfig
from shared.errors import DamselflyError, MalformedMessage
from shared.metrics import CONTENT_TYPE_LATEST, ServiceMetrics, render
from shared.subjects import StreamSpec
from shared.telemetry import extract_trace_context, service_scope, setup_tracing, tracer

logger = logging.getLogger(__name__)

ReadinessCheck = Callable[[], Awaitable[bool]]


@dataclass
class ServiceRuntime:
    """The parts every service owns, created in its lifespan and kept in ``app.state.runtime``."""

    service: str
    config: ServiceConfig
    metrics: ServiceMetrics
    bus: Bus
    readiness_checks: dict[str, ReadinessCheck] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)

    def add_readiness_check(self, name: str, check: ReadinessCheck) -> None:
        """Make ``/readyz`` depend on ``check`` as well."""
        self.readiness_checks[name] = check

    async def readiness(self) -> dict[str, bool]:
        """Every check's current answer."""
        results = {}
        for name, check in self.readiness_checks.items():
            try:
                results[name] = bool(await check())
            except Exception:
                logger.exception("readiness check %s raised", name)
                results[name] = False
        return results


@asynccontextmanager
async def service_runtime(
    app: FastAPI, config: ServiceConfig, streams: Iterable[StreamSpec] = ()
) -> AsyncIterator[ServiceRuntime]:
    """Set up tracing and metrics, connect the bus and declare ``streams``; close it all on exit."""
    setup_tracing(config.service, config.telemetry.otlp_endpoint)
    metrics: ServiceMetrics = app.state.metrics
    bus = Bus(config.nats, client_name=f"{config.service}@{config.node_name}", metrics=metrics.bus)
    await bus.connect()
    try:
        await bus.ensure_streams(*streams)
        runtime = ServiceRuntime(service=config.service, config=config, metrics=metrics, bus=bus)

        async def nats_connected() -> bool:
            return bus.is_connected

        runtime.add_readiness_check("nats", nats_connected)
        app.state.runtime = runtime
        yield runtime
    finally:
        await bus.close()


@asynccontextmanager
async def background_tasks(*coroutines: Coroutine[Any, Any, Any]) -> AsyncIterator[list[asyncio.Task[Any]]]:
    """Run ``coroutines`` as tasks for the duration of the block; cancel and await them on the way out."""
    tasks = [asyncio.create_task(coroutine) for coroutine in coroutines]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class ObservabilityMiddleware:
    """A server span and request metrics per HTTP request (route templates as labels, not raw paths)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope.get("headers", [])}
        started = time.perf_counter()
        status_holder = {"status": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                route = scope.get("route")
                template = getattr(route, "path", "<unmatched>")
                self.metrics.http.seconds.labels(method=method, route=template).observe(time.perf_counter() - started)
            await send(message)

        path = scope.get("path", "")
        # Probes and scrapes would drown the traces; they are counted but not traced.
        if path in ("/healthz", "/readyz", "/metrics"):
            try:
                await self.app(scope, receive, send_wrapper)
            finally:
                self._count(scope, method, status_holder["status"])
            return
        # The caller's traceparent makes this span a child of its client span: one trace across services.
        # The service scope names this service on the spans of the request and of the tasks it starts.
        with (
            service_scope(self.metrics.service),
            tracer().start_as_current_span(
                f"{method} {path}", context=extract_trace_context(headers), kind=SpanKind.SERVER
            ) as span,
        ):
            span.set_attribute("http.request.method", method)
            span.set_attribute("url.path", path)
            try:
                await self.app(scope, receive, send_wrapper)
            finally:
                status = status_holder["status"]
                span.set_attribute("http.response.status_code", status)
                route = scope.get("route")
                if route is not None:
                    span.update_name(f"{method} {getattr(route, 'path', path)}")
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                self._count(scope, method, status)

    def _count(self, scope: Scope, method: str, status: int) -> None:
        template = getattr(scope.get("route"), "path", "<unmatched>")
        self.metrics.http.requests.labels(method=method, route=template, status=str(status)).inc()


class StartupErrorReporter:
    """Keeps a known startup failure to one line: uvicorn would otherwise log the whole traceback."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                error = getattr(self.app.state, "startup_error", None)
                if isinstance(error, DamselflyError):
                    message = {"type": "lifespan.startup.failed", "message": ""}
            await send(message)

        await self.app(scope, receive, send_wrapper)


def record_startup_errors(
    lifespan: Callable[[FastAPI], Any],
) -> Callable[[FastAPI], Any]:
    """Wrap a lifespan so a DamselflyError raised at startup is kept on ``app.state.startup_error``."""

    @asynccontextmanager
    async def wrapped(app: FastAPI) -> AsyncIterator[None]:
        started = False
        try:
            async with lifespan(app):
                started = True
                yield
        except DamselflyError as exc:
            if not started:
                app.state.startup_error = exc
            raise

    return wrapped


# FastAPI 0.165+ traces every request itself once a tracer provider is installed: a second server span
# beside ObservabilityMiddleware's, and spans for every probe and scrape. The middleware's span is the
# one kept (route names, the service's name on it, probes left out); older FastAPI has no such option.
_NO_NATIVE_TRACING: dict[str, Any] = (
    {"telemetry": {"tracing": False}} if "telemetry" in inspect.signature(FastAPI.__init__).parameters else {}
)


def create_service_app(
    config: ServiceConfig,
    lifespan: Callable[[FastAPI], Any],
    *,
    title: str,
    description: str = "",
) -> FastAPI:
    """A FastAPI app with the common routes, error mapping and observability of every service."""
    app = FastAPI(
        title=title,
        description=description,
        version="0.1.0",
        lifespan=record_startup_errors(lifespan),
        **_NO_NATIVE_TRACING,
    )
    metrics = ServiceMetrics.create(config.service)
    app.state.metrics = metrics
    app.state.config = config
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)

    @app.exception_handler(DamselflyError)
    async def on_damselfly_error(_request: Request, exc: DamselflyError) -> JSONResponse:
        return JSONResponse(exc.to_json(), status_code=exc.http_status, headers=exc.http_headers())

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(part) for part in first.get("loc", ()))
        error = MalformedMessage(f"{where}: {first.get('msg')}")
        return JSONResponse(error.to_json(), status_code=error.http_status)

    @app.get("/healthz", tags=["health"], summary="Alive: the process answers.")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": config.service}

    @app.get("/readyz", tags=["health"], summary="Ready: NATS connected and the service's own dependencies up.")
    async def readyz(request: Request) -> JSONResponse:
        runtime: ServiceRuntime | None = getattr(request.app.state, "runtime", None)
        checks = await runtime.readiness() if runtime else {"started": False}
        ready = bool(checks) and all(checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "service": config.service, "checks": checks},
            status_code=200 if ready else 503,
        )

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics in text format.")
    async def metrics_endpoint() -> Response:
        return Response(render(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
