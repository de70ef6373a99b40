"""Composition root of the cache-store."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.cache_store import api
from services.cache_store.config import CacheStoreConfig
from services.cache_store.peer_announcer import PeerAnnouncer
from shared.db import create_db_engine, create_tables, database_ready
from shared.schemas import PeerInfo
from shared.service import create_service_app, service_runtime
from shared.subjects import PEERS_STREAM


def _advertised_ip(config: CacheStoreConfig) -> str:
    host = config.advertise_host or config.host
    if host in ("0.0.0.0", "::", ""):
        return socket.gethostbyname(socket.gethostname())
    return host


def create_app(config: CacheStoreConfig) -> FastAPI:
    """The cache-store's app: upload server, and this node's registration with the scheduler."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        storage_dir = config.effective_storage_dir
        storage_dir.mkdir(parents=True, exist_ok=True)
        engine = create_db_engine(config.effective_database_url)
        try:
            await asyncio.to_thread(create_tables, engine)
            async with service_runtime(app, config, streams=[PEERS_STREAM]) as runtime:
                runtime.add_readiness_check("database", lambda: database_ready(engine))
                info = PeerInfo(
                    peer_id=config.effective_peer_id,
                    node_name=config.node_name,
                    ip=_advertised_ip(config),
                    upload_url=config.upload_url,
                    proxy_url=config.proxy_url,
                    idc=config.idc,
                    location=config.location,
                    is_seed=config.is_seed,
                    upload_slots=config.upload_slots,
                )
                app.state.peer_info = info
                announcer = PeerAnnouncer(
                    runtime.bus,
                    info,
                    config.heartbeat_interval_seconds,
                    load=lambda: (0, 0),
                    storage_path=str(storage_dir),
                )

                async def registered() -> bool:
                    return announcer.registered.is_set()

                runtime.add_readiness_check("registered", registered)
                announcing = asyncio.create_task(announcer.run(), name="peer-announcer")
                try:
                    yield
                finally:
                    announcing.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await announcing
                    await announcer.leave()
        finally:
            engine.dispose()

    app = create_service_app(
        config,
        lifespan,
        title="Damselfly cache-store",
        description="A node's piece store and upload server.",
    )
    app.include_router(api.router)
    return app
