"""Composition root of the seed-fetcher."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.seed_fetcher.config import SeedFetcherConfig
from shared.service import create_service_app, service_runtime
from shared.subjects import ALL_STREAMS, SEED_FETCH_CONSUMER


def create_app(config: SeedFetcherConfig) -> FastAPI:
    """The seed-fetcher's app: declares the seed job queue and its durable consumer."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        config.effective_storage_dir.mkdir(parents=True, exist_ok=True)
        async with service_runtime(app, config, streams=ALL_STREAMS) as runtime:
            # Declared at start so jobs queue up durably even before the first fetcher takes one.
            await runtime.bus.declare_consumer(SEED_FETCH_CONSUMER)
            yield

    return create_service_app(
        config,
        lifespan,
        title="Damselfly seed-fetcher",
        description="Fetches blobs from the origin in pieces; the only way back to source.",
    )
