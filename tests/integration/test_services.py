"""The services over real NATS: health, readiness through a NATS outage, cross-service events and traces."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from services.cache_store.app import create_app as create_cache_store
from services.cache_store.config import CacheStoreConfig
from services.chunk_fuse.app import create_app as create_chunk_fuse
from services.chunk_fuse.config import ChunkFuseConfig
from services.piece_scheduler.app import create_app as create_scheduler
from services.piece_scheduler.config import SchedulerConfig
from services.registry_proxy.app import create_app as create_registry_proxy
from services.registry_proxy.config import RegistryProxyConfig
from services.seed_fetcher.app import create_app as create_seed_fetcher
from services.seed_fetcher.config import SeedFetcherConfig
from shared.nats_server import NatsServer
from shared.subjects import SEED_FETCH_CONSUMER, SEED_JOBS_STREAM
from tests.support.services import running, service_config
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration


async def status_is(client: httpx.AsyncClient, path: str, status: int) -> bool:
    return (await client.get(path)).status_code == status


SERVICES = [
    (SchedulerConfig, create_scheduler),
    (CacheStoreConfig, create_cache_store),
    (SeedFetcherConfig, create_seed_fetcher),
    (RegistryProxyConfig, create_registry_proxy),
    (ChunkFuseConfig, create_chunk_fuse),
]


@pytest.mark.parametrize(("config_cls", "create_app"), SERVICES, ids=lambda v: getattr(v, "service", ""))
async def test_every_service_is_healthy_ready_and_exports_metrics(
    config_cls: type, create_app: Callable, tmp_path: Path, nats_server: NatsServer
) -> None:
    app = create_app(service_config(config_cls, tmp_path, nats_server.url))
    async with running(app) as client:
        health = await client.get("/healthz")
        assert health.status_code == 200 and health.json()["service"] == config_cls.service
        await eventually(lambda: status_is(client, "/readyz", 200))
        ready = (await client.get("/readyz")).json()
        assert ready["checks"]["nats"] is True
        metrics = await client.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        families = {family.name for family in text_string_to_metric_families(metrics.text)}
        assert {"damselfly_nats_connected", "damselfly_http_requests", "damselfly_service_info"} <= families


async def test_readyz_follows_nats_down_and_back_without_restarting_services(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    scheduler = create_scheduler(service_config(SchedulerConfig, tmp_path / "s", nats_server.url))
    store = create_cache_store(
        service_config(
            CacheStoreConfig, tmp_path / "c", nats_server.url, peer_id="peer-a", heartbeat_interval_seconds=0.2
        )
    )
    async with running(scheduler) as scheduler_client, running(store) as store_client:
        for client in (scheduler_client, store_client):
            await eventually(lambda c=client: status_is(c, "/readyz", 200))

        nats_server.kill()
        for client in (scheduler_client, store_client):
            await eventually(lambda c=client: status_is(c, "/readyz", 503))
        body = (await scheduler_client.get("/readyz")).json()
        assert body["checks"]["nats"] is False and body["status"] == "not ready"
        metrics = (await scheduler_client.get("/metrics")).text
        assert "damselfly_nats_connected 0.0" in metrics

        nats_server.start()  # Same port, same store directory.
        for client in (scheduler_client, store_client):
            await eventually(lambda c=client: status_is(c, "/readyz", 200), timeout=20)

        # The bus works again end to end: heartbeats published after the outage reach the scheduler.
        before = (await scheduler_client.get("/api/v1/peers/peer-a")).json()["last_heartbeat_at"]

        async def heartbeat_after_outage() -> bool:
            peer = (await scheduler_client.get("/api/v1/peers/peer-a")).json()
            return peer["last_heartbeat_at"] != before and peer["state"] == "active"

        await eventually(heartbeat_after_outage, timeout=20)


async def test_a_nats_server_that_lost_its_store_gets_the_streams_declared_again(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "store-1").start()
    try:
        app = create_seed_fetcher(service_config(SeedFetcherConfig, tmp_path / "seed", server.url))
        async with running(app) as client:
            await eventually(lambda: status_is(client, "/readyz", 200))
            port = server.port
            server.kill()
            server = NatsServer(tmp_path / "store-2", port=port).start()  # Empty store.
            await eventually(lambda: status_is(client, "/readyz", 200), timeout=20)
            bus = app.state.runtime.bus

            async def stream_and_consumer_exist() -> bool:
                try:
                    await bus.js.stream_info(SEED_JOBS_STREAM.name)
                    await bus.js.consumer_info(SEED_JOBS_STREAM.name, SEED_FETCH_CONSUMER.durable)
                except Exception:
                    return False
                return True

            await eventually(stream_and_consumer_exist, timeout=20)
    finally:
        server.stop()


async def test_peer_registration_crosses_services_with_one_trace(
    tmp_path: Path, nats_server: NatsServer, span_exporter: InMemorySpanExporter
) -> None:
    scheduler = create_scheduler(service_config(SchedulerConfig, tmp_path / "s", nats_server.url))
    store = create_cache_store(
        service_config(
            CacheStoreConfig,
            tmp_path / "c",
            nats_server.url,
            peer_id="peer-b",
            idc="idc-1",
            location="cn|hz",
            proxy_url="http://127.0.0.1:65001",
        )
    )
    async with running(scheduler) as scheduler_client, running(store):

        async def registered() -> bool:
            return (await scheduler_client.get("/api/v1/peers/peer-b")).status_code == 200

        await eventually(registered)
        peer = (await scheduler_client.get("/api/v1/peers/peer-b")).json()
        assert peer["state"] == "active" and peer["idc"] == "idc-1" and peer["location"] == "cn|hz"
        assert peer["proxy_url"] == "http://127.0.0.1:65001"

        def spans_named(name: str) -> list:
            return [span for span in span_exporter.get_finished_spans() if span.name == name]

        async def consumer_span_finished() -> bool:
            return bool(spans_named("process peer.registered/1"))

        await eventually(consumer_span_finished, timeout=5)
        [publish] = spans_named("publish peer.registered")
        [process] = spans_named("process peer.registered/1")
        assert publish.resource.attributes.get("service.name") == process.resource.attributes.get("service.name")
        assert process.parent is not None and process.parent.span_id == publish.context.span_id
        assert process.context.trace_id == publish.context.trace_id

    # The store said goodbye when it stopped; a new scheduler replays the stream and knows that too.
    scheduler_again = create_scheduler(service_config(SchedulerConfig, tmp_path / "s2", nats_server.url))
    async with running(scheduler_again) as client:

        async def left() -> bool:
            response = await client.get("/api/v1/peers/peer-b")
            return response.status_code == 200 and response.json()["state"] == "left"

        await eventually(left)


async def test_restarted_scheduler_rebuilds_its_peer_table_from_jetstream(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    store_a = create_cache_store(service_config(CacheStoreConfig, tmp_path / "a", nats_server.url, peer_id="peer-a"))
    store_b = create_cache_store(service_config(CacheStoreConfig, tmp_path / "b", nats_server.url, peer_id="peer-b"))
    async with running(store_a) as a, running(store_b) as b:
        await eventually(lambda: status_is(a, "/readyz", 200))
        await eventually(lambda: status_is(b, "/readyz", 200))
        # The scheduler starts only now: everything it knows comes from the stream.
        scheduler = create_scheduler(service_config(SchedulerConfig, tmp_path / "s", nats_server.url))
        async with running(scheduler) as client:

            async def both_active() -> bool:
                peers = (await client.get("/api/v1/peers")).json()
                return sorted((p["peer_id"], p["state"]) for p in peers) == [
                    ("peer-a", "active"),
                    ("peer-b", "active"),
                ]

            await eventually(both_active)


async def test_scheduler_uses_postgresql_when_configured(
    tmp_path: Path, nats_server: NatsServer, postgres_database_url: str
) -> None:
    from sqlalchemy import create_engine, text

    scheduler = create_scheduler(
        service_config(SchedulerConfig, tmp_path / "s", nats_server.url, database_url=postgres_database_url)
    )
    store = create_cache_store(service_config(CacheStoreConfig, tmp_path / "c", nats_server.url, peer_id="pg-peer"))
    async with running(scheduler) as client, running(store):
        await eventually(lambda: status_is(client, "/readyz", 200))
        ready = (await client.get("/readyz")).json()
        assert ready["checks"]["database"] is True
        engine = create_engine(postgres_database_url)
        try:

            async def row_written() -> bool:
                with engine.connect() as connection:
                    rows = connection.execute(text("SELECT peer_id, state FROM peers")).all()
                return [tuple(row) for row in rows] == [("pg-peer", "active")]

            await eventually(row_written)
        finally:
            engine.dispose()


async def test_unknown_routes_and_bad_ids_get_json_errors(tmp_path: Path, nats_server: NatsServer) -> None:
    scheduler = create_scheduler(service_config(SchedulerConfig, tmp_path, nats_server.url))
    async with running(scheduler) as client:
        missing = await client.get("/api/v1/peers/nobody")
        assert missing.status_code == 404
        assert missing.json() == {
            "error": "peer_not_found",
            "message": "no peer 'nobody'",
            "details": {"peer_id": "nobody"},
        }
