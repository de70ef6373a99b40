"""Composition root of the cache-store."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.cache_store import api
from services.cache_store.config import CacheStoreConfig
from services.cache_store.janitor import CacheJanitor
from services.cache_store.metrics import CacheStoreMetrics
from services.cache_store.peer_announcer import PeerAnnouncer
from services.cache_store.upload import Uploader
from shared.db import database_ready
from shared.errors import ConfigError
from shared.piece_store import PieceStore
from shared.schemas import PeerInfo
from shared.service import background_tasks, create_service_app, service_runtime
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
        # The store is shared with the node's registry-proxy and seed-fetcher (same directory and
        # database); this process serves from it and keeps it within bounds.
        try:
            store = await asyncio.to_thread(
                lambda: PieceStore(
                    storage_dir, config.effective_database_url, write_grace_seconds=config.gc_write_grace_seconds
                )
            )
        except OSError as exc:
            raise ConfigError(f"config error: storage_dir {storage_dir} is not usable: {exc.strerror or exc}") from exc
        try:
            high, low = await asyncio.to_thread(config.watermarks)
            metrics: CacheStoreMetrics = app.state.cache_metrics
            app.state.store = store
            app.state.uploader = uploader = Uploader(
                config.upload_slots, config.upload_rate_limit_bytes, config.upload_chunk_bytes, metrics
            )
            app.state.janitor = janitor = CacheJanitor(
                store,
                metrics,
                gc_interval=config.gc_interval_seconds,
                refresh_interval=min(config.heartbeat_interval_seconds, config.gc_interval_seconds),
                ttl_seconds=config.gc_ttl_seconds,
                high_watermark_bytes=high,
                low_watermark_bytes=low,
            )
            async with service_runtime(app, config, streams=[PEERS_STREAM]) as runtime:
                runtime.add_readiness_check("database", lambda: database_ready(store.engine))
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
                    load=lambda: (uploader.slots.in_use, janitor.tasks_held),
                    storage_path=str(storage_dir),
                )

                async def registered() -> bool:
                    return announcer.registered.is_set()

                runtime.add_readiness_check("registered", registered)
                try:
                    async with background_tasks(announcer.run(), janitor.run()):
                        yield
                finally:
                    await announcer.leave()
        finally:
            store.close()

    app = create_service_app(
        config,
        lifespan,
        title="Damselfly cache-store",
        description="A node's piece store and upload server.",
    )
    # Registered once per app (not per lifespan), as the service's common metrics are.
    app.state.cache_metrics = CacheStoreMetrics.create(app.state.metrics.registry)
    app.include_router(api.router)
    return app
