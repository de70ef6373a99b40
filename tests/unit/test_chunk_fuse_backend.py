"""The registry backend against small real HTTP servers: mirror first, failover to the origin, and back."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import ClientSession, web

from services.chunk_fuse.backend import REGISTRY_HEADER, RegistryBackend
from services.chunk_fuse.mount_config import BackendConfig, MirrorConfig
from shared.errors import DependencyUnavailable, NotFound
from shared.netutil import free_port
from shared.oci.reference import RegistryRef

BLOB = bytes(range(256)) * 1024
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


@dataclass
class Server:
    """A tiny registry (or mirror) whose behaviour a test switches."""

    port: int
    status: int = 200
    ignore_range: bool = False
    requests: list[dict[str, str]] = field(default_factory=list)
    upstream: str | None = None
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def blob(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(dict(request.headers))
        if self.status != 200:
            return web.Response(status=self.status)
        if request.match_info["digest"] != DIGEST:
            return web.Response(status=404)
        if self.upstream is not None:
            async with (
                ClientSession() as session,
                session.get(f"{self.upstream}{request.path}", headers={"Range": request.headers["Range"]}) as reply,
            ):
                return web.Response(body=await reply.read(), status=reply.status)
        range_header = request.headers.get("Range")
        if range_header is None or self.ignore_range:
            return web.Response(body=BLOB)
        first, last = (int(x) for x in range_header.removeprefix("bytes=").split("-"))
        return web.Response(body=BLOB[first : last + 1], status=206)

    async def ping(self, _request: web.Request) -> web.Response:
        return web.Response(status=self.status)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v2/{name:.*}/blobs/{digest}", self.blob)
        app.router.add_get("/ping", self.ping)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def servers() -> AsyncIterator[tuple[Server, Server]]:
    origin = Server(free_port())
    mirror = Server(free_port())
    await origin.start()
    mirror.upstream = origin.url
    await mirror.start()
    try:
        yield origin, mirror
    finally:
        await mirror.stop()
        await origin.stop()


async def open_backend(origin: Server, mirror: Server | None, **backend: object) -> RegistryBackend:
    mirrors = (
        [MirrorConfig(host=mirror.url, ping_url=f"{mirror.url}/ping", health_check_interval=0.1)] if mirror else []
    )
    config = BackendConfig.model_validate({"scheme": "http", "retry_limit": 1, "mirrors": mirrors, **backend})
    instance = RegistryBackend(config, RegistryRef(f"127.0.0.1:{origin.port}", "library/app", "v1"))
    await instance.open()
    return instance


async def test_ranges_go_through_the_mirror_with_the_origin_named(servers: tuple[Server, Server]) -> None:
    origin, mirror = servers
    backend = await open_backend(origin, mirror)
    try:
        assert await backend.get_range(DIGEST, 1000, 5000) == BLOB[1000:6000]
        assert mirror.requests[-1][REGISTRY_HEADER] == origin.url
        assert mirror.requests[-1]["Range"] == "bytes=1000-5999"
        stats = backend.stats.snapshot()
        assert (stats["mirror_requests"], stats["origin_requests"]) == (1, 0)
        assert stats["bytes_fetched"] == 5000
    finally:
        await backend.close()


async def test_a_failing_mirror_sends_reads_to_the_origin_until_its_ping_answers(
    servers: tuple[Server, Server],
) -> None:
    origin, mirror = servers
    backend = await open_backend(origin, mirror)
    try:
        mirror.status = 503
        assert await backend.get_range(DIGEST, 0, 100) == BLOB[:100]
        assert not backend.mirrors[0].healthy
        asked = len(mirror.requests)
        assert await backend.get_range(DIGEST, 100, 100) == BLOB[100:200]
        assert len(mirror.requests) == asked, "an unhealthy mirror gets no reads"
        assert backend.stats.snapshot()["mirror_failovers"] == 1
        mirror.status = 200
        for _ in range(50):
            if backend.mirrors[0].healthy:
                break
            await asyncio.sleep(0.05)
        assert backend.mirrors[0].healthy
        assert await backend.get_range(DIGEST, 200, 100) == BLOB[200:300]
        assert len(mirror.requests) > asked
    finally:
        await backend.close()


async def test_a_dead_mirror_fails_over_at_once(servers: tuple[Server, Server]) -> None:
    origin, mirror = servers
    backend = await open_backend(origin, mirror)
    try:
        await mirror.stop()
        assert await backend.get_range(DIGEST, 10, 10) == BLOB[10:20]
        assert not backend.mirrors[0].healthy
        assert backend.stats.snapshot()["origin_requests"] == 1
    finally:
        await backend.close()


async def test_a_server_that_ignores_range_still_gives_the_range(servers: tuple[Server, Server]) -> None:
    origin, _ = servers
    origin.ignore_range = True
    backend = await open_backend(origin, None)
    try:
        assert await backend.get_range(DIGEST, 300, 7) == BLOB[300:307]
    finally:
        await backend.close()


async def test_origin_errors_are_typed(servers: tuple[Server, Server]) -> None:
    origin, _ = servers
    backend = await open_backend(origin, None)
    try:
        with pytest.raises(NotFound):
            await backend.get_range("sha256:" + "0" * 64, 0, 10)
        origin.status = 500
        with pytest.raises(DependencyUnavailable):
            await backend.get_range(DIGEST, 0, 10)
        assert origin.requests and len(origin.requests) == 1 + 2, "one try plus retry_limit=1 retry"
    finally:
        await backend.close()
