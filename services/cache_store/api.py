"""The cache-store's HTTP routes (the upload server other peers and nydusd's ping reach)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

router = APIRouter(tags=["upload"])


@router.get("/server/ping", summary="Liveness ping, as Dragonfly's upload server answers it (nydusd ping_url).")
async def ping() -> PlainTextResponse:
    return PlainTextResponse("pong")


@router.get("/api/v1/peer", summary="This node's peer identity.")
async def whoami(request: Request) -> dict[str, object]:
    return request.app.state.peer_info.model_dump(mode="json")  # type: ignore[no-any-return]
