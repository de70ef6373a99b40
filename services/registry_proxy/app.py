"""Composition root of the registry-proxy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from fastapi import FastAPI

from services.registry_proxy import api
from services.registry_proxy.api import BlobChecks, ManifestCache, MirrorState
from services.registry_proxy.config import RegistryProxyConfig
from services.registry_proxy.downloader import PeerDownloader
from services.registry_proxy.metrics import ProxyMetrics
from services.registry_proxy.origins import ProxyPolicy
from shared.piece_store import PieceStore
from shared.ratelimit import bucket_for
from shared.registry_client import OriginClient
from shared.service import create_service_app, service_runtime
from shared.subjects import ALL_STREAMS
from shared.telemetry import client_trace_config


def create_app(config: RegistryProxyConfig) -> FastAPI:
    """The registry-proxy's app: an OCI mirror; blobs are downloaded piece by piece through P2P."""
    policy = ProxyPolicy.from_config(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = await asyncio.to_thread(PieceStore, config.effective_storage_dir, config.database_url)
        connector = aiohttp.TCPConnector(limit=256, limit_per_host=32)
        metrics: ProxyMetrics = app.state.proxy_metrics
        async with (
            # Traced: requests to parents and origins carry traceparent, so their servers join the trace.
            aiohttp.ClientSession(
                connector=connector, auto_decompress=False, trace_configs=[client_trace_config()]
            ) as session,
            service_runtime(app, config, streams=ALL_STREAMS) as runtime,
        ):
            downloader = PeerDownloader(
                peer_id=config.effective_peer_id,
                store=store,
                bus=runtime.bus,
                session=session,
                parallel_pieces=config.parallel_pieces,
                piece_timeout=config.piece_timeout_seconds,
                metrics=metrics,
                rate_limit=bucket_for(config.download_rate_limit_bytes),
            )
            app.state.mirror = MirrorState(
                policy=policy,
                origin=OriginClient(session, insecure=config.registry_mirror.insecure),
                downloader=downloader,
                manifests=ManifestCache(config.manifest_cache_entries),
                prefetch=config.prefetch,
                metrics=metrics,
                blob_checks=BlobChecks(config.blob_check_seconds),
            )
            try:
                yield
            finally:
                await downloader.close()

    app = create_service_app(
        config,
        lifespan,
        title="Damselfly registry-proxy",
        description="A node's OCI registry mirror; blobs are served through the P2P network.",
    )
    # Registered once per app (not per lifespan), as the service's common metrics are.
    app.state.proxy_metrics = ProxyMetrics.create(app.state.metrics.registry)
    app.include_router(api.router)
    return app
