"""Composition root of the registry-proxy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.registry_proxy import api
from services.registry_proxy.config import RegistryProxyConfig
from shared.service import create_service_app, service_runtime
from shared.subjects import ALL_STREAMS


def create_app(config: RegistryProxyConfig) -> FastAPI:
    """The registry-proxy's app."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with service_runtime(app, config, streams=ALL_STREAMS):
            yield

    app = create_service_app(
        config,
        lifespan,
        title="Damselfly registry-proxy",
        description="A node's OCI registry mirror; blobs are served through the P2P network.",
    )
    app.include_router(api.router)
    return app
