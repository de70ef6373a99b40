"""One blob pull through a peer is one trace across the services, over HTTP and NATS.

The services run in this process (the in-memory span exporter sees every span), on a real NATS and a
real origin registry; the seed's cache-store is a real uvicorn server, so the peer fetches its pieces
over TCP exactly as between nodes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import urllib.request
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.cache_store.app import create_app as create_cache_store
from services.cache_store.config import CacheStoreConfig
from services.piece_scheduler.app import create_app as create_scheduler
from services.piece_scheduler.config import SchedulerConfig
from services.registry_proxy.app import create_app as create_registry_proxy
from services.registry_proxy.config import RegistryProxyConfig
from services.seed_fetcher.app import create_app as create_seed_fetcher
from services.seed_fetcher.config import SeedFetcherConfig
from shared.nats_server import NatsServer
from shared.telemetry import SERVICE_ATTRIBUTE
from tests.support.ports import free_port
from tests.support.registry import RegistryServer
from tests.support.services import running, service_config
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def push_blob(registry: RegistryServer, repository: str, data: bytes) -> str:
    """Upload one blob (POST, then a monolithic PUT with its digest); returns the digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    start = urllib.request.Request(f"{registry.url}/v2/{repository}/blobs/uploads/", method="POST")
    with urllib.request.urlopen(start) as response:
        location = response.headers["Location"]
    url = location if location.startswith("http") else f"{registry.url}{location}"
    separator = "&" if "?" in url else "?"
    # An octet-stream body: the registry would parse a form-encoded one (urllib's default) as a form.
    finish = urllib.request.Request(
        f"{url}{separator}digest={digest}",
        data=data,
        method="PUT",
        headers={"Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(finish) as response:
        assert response.status == 201
    return digest


@asynccontextmanager
async def served(app: FastAPI, port: int) -> AsyncIterator[None]:
    """``app`` behind a real uvicorn server in this process and event loop, lifespan included."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_config=None))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                raise AssertionError(f"the server on port {port} did not start")
            await asyncio.sleep(0.02)
        yield
    finally:
        server.should_exit = True
        await task


@dataclass
class InProcessCluster:
    """A scheduler, a seed node (seed-fetcher + cache-store on one store) and one peer's registry-proxy."""

    proxy: httpx.AsyncClient
    scheduler: httpx.AsyncClient
    seed: httpx.AsyncClient


@asynccontextmanager
async def in_process_cluster(workdir: Path, nats_url: str, origin: str) -> AsyncIterator[InProcessCluster]:
    seed_store = {"storage_dir": workdir / "seed" / "pieces", "database_url": f"sqlite:///{workdir}/seed/store.db"}
    (workdir / "seed").mkdir(parents=True)
    seed_upload_port = free_port()
    async with AsyncExitStack() as stack:
        scheduler = await stack.enter_async_context(
            running(create_scheduler(service_config(SchedulerConfig, workdir / "scheduler", nats_url)))
        )
        await stack.enter_async_context(
            served(
                create_cache_store(
                    service_config(
                        CacheStoreConfig,
                        workdir / "seed",
                        nats_url,
                        node_name="seed-0",
                        peer_id="seed-0",
                        is_seed=True,
                        port=seed_upload_port,
                        heartbeat_interval_seconds=0.5,
                        **seed_store,
                    )
                ),
                seed_upload_port,
            )
        )
        seed = await stack.enter_async_context(
            running(
                create_seed_fetcher(
                    service_config(
                        SeedFetcherConfig,
                        workdir / "seed",
                        nats_url,
                        node_name="seed-0",
                        seed_id="seed-0",
                        allowed_registries=[origin],
                        **seed_store,
                    )
                )
            )
        )
        proxy = await stack.enter_async_context(
            running(
                create_registry_proxy(
                    service_config(
                        RegistryProxyConfig,
                        workdir / "peer-0",
                        nats_url,
                        node_name="peer-0",
                        peer_id="peer-0",
                        registry_mirror={"url": origin},
                        allowed_registries=[origin],
                    )
                )
            )
        )
        for client in (scheduler, seed, proxy):
            await eventually(lambda c=client: ready(c), what="readiness")
        yield InProcessCluster(proxy=proxy, scheduler=scheduler, seed=seed)


async def ready(client: httpx.AsyncClient) -> bool:
    return (await client.get("/readyz")).status_code == 200


def service_of(span: ReadableSpan) -> str | None:
    value = (span.attributes or {}).get(SERVICE_ATTRIBUTE)
    return str(value) if value is not None else None


def ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[ReadableSpan]:
    """The span's parent, its parent's parent, and so on, as far as the trace has them."""
    chain = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        chain.append(span)
    return chain


async def test_a_blob_pulled_through_a_peer_is_one_trace_across_proxy_scheduler_seed_and_cache_store(
    tmp_path: Path, nats_server: NatsServer, registry: RegistryServer, span_exporter: InMemorySpanExporter
) -> None:
    data = os.urandom(3 * MIB)  # Three pieces (of 1 MiB: see shared.tasks.piece_size_for).
    digest = push_blob(registry, "test/traced", data)
    async with in_process_cluster(tmp_path, nats_server.url, registry.url) as cluster:
        span_exporter.clear()  # Start-up's own traces (registrations, heartbeats) are not the pull's.
        response = await cluster.proxy.get(f"/v2/test/traced/blobs/{digest}")
        assert response.status_code == 200 and response.content == data

        def spans() -> tuple[ReadableSpan, ...]:
            return span_exporter.get_finished_spans()

        def root() -> ReadableSpan:
            [span] = [
                s for s in spans() if s.kind is SpanKind.SERVER and s.name == "GET /v2/{name:path}/blobs/{digest}"
            ]
            return span

        def trace_of(trace_id: int) -> list[ReadableSpan]:
            return [span for span in spans() if span.context.trace_id == trace_id]

        async def settled() -> bool:
            # The seed's job span ends once its blob is verified; the scheduler consumes the last
            # announcements a moment after the client got its bytes.
            trace = trace_of(root().context.trace_id)
            ids = {span.context.span_id for span in trace}
            seed_done = any(s.name.startswith("process seed.fetch.requested") for s in trace)
            return seed_done and all(s.parent is None or s.parent.span_id in ids for s in trace)

        await eventually(settled, what="the pull's spans to finish")

    top = root()
    trace = trace_of(top.context.trace_id)
    by_id = {span.context.span_id: span for span in trace}
    assert service_of(top) == "registry_proxy" and top.parent is None
    # A tree: every span but the root has its parent in the trace, so every span reaches the root.
    for span in trace:
        assert span is top or top in ancestors(span, by_id), span.name
    assert {service_of(span) for span in trace} >= {"registry_proxy", "scheduler", "seed_fetcher", "cache_store"}

    def in_trace(service: str, kind: SpanKind, prefix: str) -> list[ReadableSpan]:
        return [s for s in trace if service_of(s) == service and s.kind is kind and s.name.startswith(prefix)]

    # Proxy -> scheduler over NATS request/reply -> seed job over JetStream.
    [job] = in_trace("seed_fetcher", SpanKind.CONSUMER, "process seed.fetch.requested")
    publish, serve, request, *rest = ancestors(job, by_id)
    assert (service_of(publish), publish.kind, publish.name) == (
        "scheduler",
        SpanKind.PRODUCER,
        "publish seed.fetch.requested",
    )
    assert (service_of(serve), serve.kind, serve.name) == ("scheduler", SpanKind.SERVER, "serve assignment.request")
    assert (service_of(request), request.kind, request.name) == (
        "registry_proxy",
        SpanKind.CLIENT,
        "request assignment.request",
    )
    assert rest[-1] is top
    # The seed's requests to the origin are client spans of its job.
    origin_gets = [
        span
        for span in in_trace("seed_fetcher", SpanKind.CLIENT, "GET")
        if "/v2/test/traced/blobs/" in str((span.attributes or {}).get("url.full"))
    ]
    assert len(origin_gets) >= 3 and all(job in ancestors(span, by_id) for span in origin_gets)
    # Proxy -> the seed's cache-store over HTTP: each upload's server span (a piece, or a run of consecutive
    # pieces as one range) is a child of the proxy's client span.
    upload_routes = ("GET /download/{task_id}/pieces/{number}", "GET /download/{task_id}")
    uploads = [s for s in in_trace("cache_store", SpanKind.SERVER, "GET /download/") if s.name in upload_routes]
    assert 1 <= len(uploads) <= 3
    for upload in uploads:
        assert upload.parent is not None
        client = by_id[upload.parent.span_id]
        assert (service_of(client), client.kind, client.name) == ("registry_proxy", SpanKind.CLIENT, "GET")
        assert "/download/" in str((client.attributes or {}).get("url.full"))
        assert (upload.attributes or {}).get("http.response.status_code") in (200, 206)
    # One trace: no assignment, seed job or piece upload of this pull ended up in another one.
    for span in spans():
        if span.name in ("serve assignment.request", *upload_routes) or (
            span.name.startswith("process seed.fetch.requested")
        ):
            assert span.context.trace_id == top.context.trace_id, span.name
