"""An origin that drops long blob ranges part-way: a registry behind a forwarder that cuts connections."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from tests.support.http import serving

# Hop-by-hop or recomputed by the server: not forwarded as they came.
_DROPPED = {"host", "connection", "transfer-encoding", "keep-alive", "content-length"}


@dataclass
class CuttingOrigin:
    """Where the forwarder listens, and the blob ranges it cut (their paths and Range headers)."""

    url: str
    cuts: list[tuple[str, str]] = field(default_factory=list)


@asynccontextmanager
async def cutting_origin(target: str, cut_after: int) -> AsyncIterator[CuttingOrigin]:
    """Forward everything to the registry at ``target``, except that a blob range answer longer than
    ``cut_after`` bytes promises the whole range (its Content-Length) and sends only ``cut_after`` bytes
    before the connection drops, as a flaky link to a WAN registry would."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        origin = CuttingOrigin(url="")

        async def forward(request: web.Request) -> web.StreamResponse:
            headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROPPED}
            body = await request.read()
            async with session.request(
                request.method, target + request.path_qs, headers=headers, data=body or None, allow_redirects=False
            ) as upstream:
                data = await upstream.read()
                out = {k: v for k, v in upstream.headers.items() if k.lower() not in _DROPPED}
                length = upstream.headers.get("Content-Length", str(len(data)))
            cut = request.method == "GET" and upstream.status == 206 and "/blobs/" in request.path
            if cut and len(data) > cut_after:
                origin.cuts.append((request.path, request.headers.get("Range", "")))
                response = web.StreamResponse(status=206, headers={**out, "Content-Length": str(len(data))})
                await response.prepare(request)
                await response.write(data[:cut_after])
                assert request.transport is not None
                request.transport.close()
                return response
            if request.method == "HEAD":
                response = web.StreamResponse(status=upstream.status, headers={**out, "Content-Length": length})
                await response.prepare(request)
                return response
            return web.Response(status=upstream.status, headers=out, body=data)

        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", forward)
        async with serving(app) as port:
            origin.url = f"http://127.0.0.1:{port}"
            yield origin
