"""The origin client's streamed range: parts as they arrive, and clear errors when the origin misbehaves."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from shared.errors import DependencyUnavailable, UpstreamError
from shared.registry_client import OriginClient
from tests.support.http import serving

BLOB = bytes(range(256)) * 64  # 16 KiB


async def _serve_range(request: web.Request) -> web.StreamResponse:
    """A well-behaved origin: the asked range, with 206."""
    first, last = (int(x) for x in request.headers["Range"].removeprefix("bytes=").split("-"))
    return web.Response(status=206, body=BLOB[first : last + 1])


async def _ignore_range(request: web.Request) -> web.StreamResponse:
    return web.Response(status=200, body=BLOB)


async def _cut_short(request: web.Request) -> web.StreamResponse:
    """Promises the range, sends 5000 bytes of it and drops the connection."""
    first, last = (int(x) for x in request.headers["Range"].removeprefix("bytes=").split("-"))
    response = web.StreamResponse(status=206, headers={"Content-Length": str(last - first + 1)})
    await response.prepare(request)
    await response.write(BLOB[first : first + 5000])
    assert request.transport is not None
    request.transport.close()
    return response


@pytest.fixture
async def origin() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/ok", _serve_range)
    app.router.add_get("/whole", _ignore_range)
    app.router.add_get("/cut", _cut_short)
    async with serving(app) as port:
        yield f"http://127.0.0.1:{port}"


async def _parts(url: str, start: int, lengths: list[int], got: list[bytes]) -> None:
    async with aiohttp.ClientSession() as session:
        client = OriginClient(session, max_attempts=1)
        async for part in client.range_parts(url, start, lengths, None):
            got.append(part)


async def test_a_range_arrives_in_the_parts_asked_for(origin: str) -> None:
    got: list[bytes] = []
    await _parts(f"{origin}/ok", 1000, [4096, 4096, 100], got)
    assert got == [BLOB[1000:5096], BLOB[5096:9192], BLOB[9192:9292]]


async def test_an_origin_that_ignores_range_is_an_upstream_error_before_any_part(origin: str) -> None:
    got: list[bytes] = []
    with pytest.raises(UpstreamError, match="not 206"):
        await _parts(f"{origin}/whole", 0, [4096, 4096], got)
    assert got == []


async def test_a_cut_connection_keeps_the_parts_that_arrived_whole(origin: str) -> None:
    got: list[bytes] = []
    with pytest.raises(DependencyUnavailable, match="short"):
        await _parts(f"{origin}/cut", 0, [4096, 4096, 4096], got)
    assert got == [BLOB[:4096]]  # 5000 bytes came: the first part whole, the second not.
