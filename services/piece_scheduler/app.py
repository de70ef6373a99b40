"""Composition root of the piece-scheduler."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.piece_scheduler import api
from services.piece_scheduler.config import SchedulerConfig
from services.piece_scheduler.handlers import PEER_EVENTS_CONSUMER, PeerEventHandler, sweep_peers
from services.piece_scheduler.peer_registry import PeerRegistry
from shared.db import create_db_engine, create_tables, database_ready
from shared.service import create_service_app, service_runtime
from shared.subjects import ALL_STREAMS


def create_app(config: SchedulerConfig) -> FastAPI:
    """The scheduler's app: peer table fed from NATS, admin routes, health and metrics."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_db_engine(config.effective_database_url)
        try:
            await asyncio.to_thread(create_tables, engine)
            async with service_runtime(app, config, streams=ALL_STREAMS) as runtime:
                runtime.add_readiness_check("database", lambda: database_ready(engine))
                registry = PeerRegistry(config.peer_stale_after_seconds, config.peer_evict_after_seconds)
                app.state.peers = registry
                handler = PeerEventHandler(registry, engine)
                runtime.bus.consume(PEER_EVENTS_CONSUMER, handler, name="scheduler-peers")
                sweeper = asyncio.create_task(sweep_peers(handler, config.sweep_interval_seconds), name="peer-sweep")
                try:
                    yield
                finally:
                    sweeper.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sweeper
        finally:
            engine.dispose()

    app = create_service_app(
        config,
        lifespan,
        title="Damselfly piece-scheduler",
        description="Which peer holds which piece, and who fetches from whom.",
    )
    app.include_router(api.router)
    return app
