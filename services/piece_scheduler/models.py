"""The scheduler's tables: a durable record of every peer ever seen (the stream ages out)."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, Session, SQLModel

from services.piece_scheduler.peer_registry import PeerRecord


class PeerRow(SQLModel, table=True):
    """One peer's last known info and state."""

    __tablename__ = "peers"

    peer_id: str = Field(primary_key=True, max_length=128)
    node_name: str = ""
    ip: str = ""
    upload_url: str = ""
    proxy_url: str | None = None
    idc: str = ""
    location: str = ""
    is_seed: bool = False
    state: str = Field(index=True)
    registered_at: datetime | None = None
    updated_at: datetime


def upsert_peer(session: Session, record: PeerRecord, now: datetime) -> None:
    """Write ``record`` over the peer's row (creating it when new)."""
    row = session.get(PeerRow, record.peer_id) or PeerRow(
        peer_id=record.peer_id, state=record.state.value, updated_at=now
    )
    if record.info is not None:
        row.node_name = record.info.node_name
        row.ip = record.info.ip
        row.upload_url = record.info.upload_url
        row.proxy_url = record.info.proxy_url
        row.idc = record.info.idc
        row.location = record.info.location
        row.is_seed = record.info.is_seed
    row.state = record.state.value
    row.registered_at = record.registered_at
    row.updated_at = now
    session.add(row)
