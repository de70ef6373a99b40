"""The scheduler's HTTP routes: the cluster view of peers."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Request
from pydantic import BaseModel

from services.piece_scheduler.peer_registry import PeerRecord, PeerRegistry

router = APIRouter(prefix="/api/v1", tags=["peers"])


class PeerView(BaseModel):
    """A peer as the admin API shows it."""

    peer_id: str
    state: str
    node_name: str | None
    ip: str | None
    upload_url: str | None
    proxy_url: str | None
    idc: str | None
    location: str | None
    is_seed: bool
    upload_slots: int | None
    upload_slots_in_use: int
    tasks_held: int
    registered_at: datetime | None
    last_heartbeat_at: datetime | None

    @classmethod
    def of(cls, record: PeerRecord) -> PeerView:
        """The view of one record."""
        info = record.info
        return cls(
            peer_id=record.peer_id,
            state=record.state.value,
            node_name=info.node_name if info else None,
            ip=info.ip if info else None,
            upload_url=info.upload_url if info else None,
            proxy_url=info.proxy_url if info else None,
            idc=info.idc if info else None,
            location=info.location if info else None,
            is_seed=info.is_seed if info else False,
            upload_slots=info.upload_slots if info else None,
            upload_slots_in_use=record.upload_slots_in_use,
            tasks_held=record.tasks_held,
            registered_at=record.registered_at,
            last_heartbeat_at=record.last_heartbeat_at,
        )


def peer_registry(request: Request) -> PeerRegistry:
    """The app's peer registry (created in the lifespan)."""
    registry: PeerRegistry = request.app.state.peers
    return registry


@router.get("/peers", summary="Every peer the scheduler knows, with its state and load.")
async def list_peers(request: Request) -> list[PeerView]:
    return [PeerView.of(record) for record in peer_registry(request).all()]


@router.get("/peers/{peer_id}", summary="One peer.")
async def get_peer(peer_id: str, request: Request) -> PeerView:
    return PeerView.of(peer_registry(request).get(peer_id))
