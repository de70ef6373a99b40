"""The scheduler's HTTP routes: the cluster view of peers and tasks."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel

from services.piece_scheduler.peer_registry import PeerRecord, PeerRegistry
from services.piece_scheduler.task_map import PieceRecord, TaskMap, TaskRecord

router = APIRouter(prefix="/api/v1")


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


@router.get("/peers", tags=["peers"], summary="Every peer the scheduler knows, with its state and load.")
async def list_peers(request: Request) -> list[PeerView]:
    return [PeerView.of(record) for record in peer_registry(request).all()]


@router.get("/peers/{peer_id}", tags=["peers"], summary="One peer.")
async def get_peer(peer_id: str, request: Request) -> PeerView:
    return PeerView.of(peer_registry(request).get(peer_id))


class PieceView(BaseModel):
    """One piece of a task: where it lies and who holds it."""

    number: int
    state: str
    range_start: int | None
    range_length: int | None
    digest: str | None
    holders: list[str]

    @classmethod
    def of(cls, task: TaskRecord, piece: PieceRecord) -> PieceView:
        """The view of one piece."""
        return cls(
            number=piece.number,
            state=piece.state.value,
            range_start=piece.range_start,
            range_length=piece.range_length,
            digest=piece.digest,
            holders=task.good_holders(piece),
        )


class TaskView(BaseModel):
    """A task as the admin API lists it."""

    task_id: str
    state: str
    url: str | None
    digest: str | None
    content_length: int | None
    piece_size: int | None
    piece_count: int | None
    pieces_held: int
    holders: int
    back_to_source_count: int
    seed_attempts: int
    seed_in_flight: bool
    last_seed_error: str | None
    blocked_parents: list[str]
    failures: dict[str, int]

    @classmethod
    def of(cls, task: TaskRecord) -> TaskView:
        """The view of one task."""
        return cls(**cls._fields_of(task))

    @staticmethod
    def _fields_of(task: TaskRecord) -> dict[str, Any]:
        return {
            "task_id": task.task_id,
            "state": task.state.value,
            "url": task.url,
            "digest": task.digest,
            "content_length": task.content_length,
            "piece_size": task.piece_size,
            "piece_count": task.piece_count,
            "pieces_held": len(task.held_numbers()),
            "holders": len(task.pieces_by_holder()),
            "back_to_source_count": task.back_to_source_count,
            "seed_attempts": task.seed_attempts,
            "seed_in_flight": task.seed_in_flight,
            "last_seed_error": task.last_seed_error,
            "blocked_parents": sorted(task.blocked_parents),
            "failures": dict(task.failures),
        }


class TaskDetailView(TaskView):
    """One task with its pieces, and which peer holds which pieces."""

    pieces: list[PieceView]
    peers: dict[str, list[int]]

    @classmethod
    def of(cls, task: TaskRecord) -> TaskDetailView:
        """The detailed view of one task (pieces of the layout that nobody announced show as missing)."""
        numbers = set(task.pieces) | set(range(task.piece_count or 0))
        pieces = [
            PieceView.of(task, task.pieces[number])
            if number in task.pieces
            else PieceView(number=number, state="missing", range_start=None, range_length=None, digest=None, holders=[])
            for number in sorted(numbers)
        ]
        return cls(**cls._fields_of(task), pieces=pieces, peers=task.pieces_by_holder())


def task_map(request: Request) -> TaskMap:
    """The app's piece map (created in the lifespan)."""
    tasks: TaskMap = request.app.state.tasks
    return tasks


@router.get("/tasks", tags=["tasks"], summary="Every task the scheduler knows: size, pieces held, state.")
async def list_tasks(request: Request) -> list[TaskView]:
    return [TaskView.of(task) for task in task_map(request).all()]


@router.get("/tasks/{task_id}", tags=["tasks"], summary="One task, with which peer holds which pieces.")
async def get_task(task_id: str, request: Request) -> TaskDetailView:
    return TaskDetailView.of(task_map(request).get(task_id))
