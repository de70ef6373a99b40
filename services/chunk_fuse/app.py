"""Composition root of the chunk-fuse agent."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.chunk_fuse.api import router
from services.chunk_fuse.config import ChunkFuseConfig
from services.chunk_fuse.metrics import MountCollector
from services.chunk_fuse.mounts import MountManager
from shared.service import create_service_app, service_runtime
from shared.subjects import ALL_STREAMS


def create_app(config: ChunkFuseConfig) -> FastAPI:
    """The agent's app; ready only where FUSE can actually be mounted."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        config.effective_cache_dir.mkdir(parents=True, exist_ok=True)
        async with service_runtime(app, config, streams=ALL_STREAMS) as runtime:

            async def fuse_available() -> bool:
                # Mounting needs the device and the setuid helper that unmounts (fuse3's fusermount3).
                return os.access(config.fuse_device, os.R_OK | os.W_OK) and shutil.which("fusermount3") is not None

            runtime.add_readiness_check("fuse", fuse_available)
            mounts = MountManager(config, runtime.bus)
            await mounts.start()
            app.state.mounts = mounts
            try:
                yield
            finally:
                await mounts.stop()

    app = create_service_app(
        config,
        lifespan,
        title="Damselfly chunk-fuse agent",
        description="Lazy FUSE mounts of converted images, reading chunks through the P2P mirror.",
    )
    # Registered with the app, not in the lifespan, so the families are there from the first scrape.
    app.state.metrics.registry.register(MountCollector(lambda: getattr(app.state, "mounts", None)))
    app.include_router(router)
    return app
