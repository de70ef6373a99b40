"""Composition root of the seed-fetcher."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from fastapi import FastAPI

from services.seed_fetcher.config import SeedFetcherConfig
from services.seed_fetcher.fetcher import SeedFetcher
from services.seed_fetcher.handlers import SeedJobHandler
from services.seed_fetcher.metrics import SeedMetrics
from services.seed_fetcher.resolver import ImageResolver
from shared.db import database_ready
from shared.piece_store import PieceStore
from shared.ratelimit import bucket_for
from shared.registry_client import OriginClient
from shared.service import create_service_app, service_runtime
from shared.subjects import ALL_STREAMS, SEED_FETCH_CONSUMER
from shared.telemetry import client_trace_config


def create_app(config: SeedFetcherConfig) -> FastAPI:
    """The seed-fetcher's app: takes jobs from the seed queue and fills its node's piece store."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = await asyncio.to_thread(PieceStore, config.effective_storage_dir, config.database_url)
        connector = aiohttp.TCPConnector(limit=64, limit_per_host=config.parallel_ranges * 4)
        async with (
            # Traced: each request to the origin is a client span of the job's trace.
            aiohttp.ClientSession(connector=connector, trace_configs=[client_trace_config()]) as session,
            service_runtime(app, config, streams=ALL_STREAMS) as runtime,
        ):
            runtime.add_readiness_check("database", lambda: database_ready(store.engine))
            fetcher = SeedFetcher(
                seed_id=config.effective_seed_id,
                store=store,
                origin=OriginClient(session, max_attempts=config.max_attempts, insecure=config.insecure),
                bus=runtime.bus,
                allowed_origins=config.allowed_registries,
                parallel_ranges=config.parallel_ranges,
                metrics=app.state.seed_metrics,
                rate_limit=bucket_for(config.back_to_source_rate_limit_bytes),
                idle_seconds=config.on_demand_idle_seconds,
            )
            app.state.fetcher = fetcher
            await ImageResolver(fetcher.origin, config.allowed_registries).serve(runtime.bus)
            runtime.bus.consume(SEED_FETCH_CONSUMER, SeedJobHandler(fetcher), name="seed-fetchers")
            yield

    app = create_service_app(
        config,
        lifespan,
        title="Damselfly seed-fetcher",
        description="Fetches blobs from the origin in pieces; the only way back to source.",
    )
    # Registered once per app (not per lifespan), as the service's common metrics are.
    app.state.seed_metrics = SeedMetrics.create(app.state.metrics.registry)
    return app
