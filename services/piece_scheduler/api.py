"""The scheduler's admin API: the cluster view of peers and tasks, and preheat jobs.

Reads need the admin token unless opened by config, changes always need it (see
:mod:`services.piece_scheduler.auth`). Lists are paginated with ``page`` and ``per_page``; the total
is in ``X-Total-Count`` and the neighbouring pages in ``Link`` (as GitHub's API and Dragonfly's
manager do).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from services.piece_scheduler.auth import require_read, require_write
from services.piece_scheduler.config import AdminApiConfig
from services.piece_scheduler.jobs import BlobProgress, JobRow, JobService, PreheatSpec
from services.piece_scheduler.peer_registry import PeerRecord, PeerRegistry
from services.piece_scheduler.task_map import PieceRecord, TaskMap, TaskRecord
from shared.errors import InvalidRequest
from shared.oci.auth import Credentials

router = APIRouter(prefix="/api/v1", dependencies=[Depends(require_read)])
T = TypeVar("T")


class Page:
    """The ``page``/``per_page`` query of a list endpoint."""

    def __init__(
        self,
        request: Request,
        page: Annotated[int, Query(ge=1, description="Page number, from 1.")] = 1,
        per_page: Annotated[int, Query(ge=1, description="Items per page (at most api.max_page_size).")] = 100,
    ) -> None:
        limit: AdminApiConfig = request.app.state.admin_api
        if per_page > limit.max_page_size:
            raise InvalidRequest(f"per_page {per_page} is over the limit of {limit.max_page_size}")
        self.request = request
        self.page = page
        self.per_page = per_page

    @property
    def offset(self) -> int:
        """Items before this page."""
        return (self.page - 1) * self.per_page

    def slice(self, items: Sequence[T]) -> list[T]:
        """This page of ``items``."""
        return list(items[self.offset : self.offset + self.per_page])

    def headers(self, response: Response, total: int) -> None:
        """Set ``X-Total-Count`` and the ``Link`` relations of this page."""
        response.headers["X-Total-Count"] = str(total)
        last = max(1, -(-total // self.per_page))
        links = {"first": 1, "last": last}
        if self.page > 1:
            links["prev"] = min(self.page - 1, last)
        if self.page < last:
            links["next"] = self.page + 1
        url = self.request.url
        response.headers["Link"] = ", ".join(
            f'<{url.include_query_params(page=number, per_page=self.per_page)}>; rel="{rel}"'
            for rel, number in links.items()
        )


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
    pieces_held: int
    disk_free_bytes: int | None
    registered_at: datetime | None
    last_heartbeat_at: datetime | None

    @classmethod
    def of(cls, record: PeerRecord, pieces_held: int) -> PeerView:
        """The view of one record; ``pieces_held`` is counted from the piece map."""
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
            pieces_held=pieces_held,
            disk_free_bytes=record.disk_free_bytes,
            registered_at=record.registered_at,
            last_heartbeat_at=record.last_heartbeat_at,
        )


def peer_registry(request: Request) -> PeerRegistry:
    """The app's peer registry (created in the lifespan)."""
    registry: PeerRegistry = request.app.state.peers
    return registry


@router.get("/peers", tags=["peers"], summary="The peers the scheduler knows, with their state and load.")
async def list_peers(request: Request, response: Response, page: Annotated[Page, Depends()]) -> list[PeerView]:
    records = peer_registry(request).all()
    page.headers(response, len(records))
    held = task_map(request).pieces_per_holder()
    return [PeerView.of(record, held.get(record.peer_id, 0)) for record in page.slice(records)]


@router.get("/peers/{peer_id}", tags=["peers"], summary="One peer.")
async def get_peer(peer_id: str, request: Request) -> PeerView:
    record = peer_registry(request).get(peer_id)
    return PeerView.of(record, task_map(request).pieces_per_holder().get(peer_id, 0))


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


@router.get("/tasks", tags=["tasks"], summary="The tasks the scheduler knows: size, pieces held, state.")
async def list_tasks(request: Request, response: Response, page: Annotated[Page, Depends()]) -> list[TaskView]:
    tasks = task_map(request).all()
    page.headers(response, len(tasks))
    return [TaskView.of(task) for task in page.slice(tasks)]


@router.get("/tasks/{task_id}", tags=["tasks"], summary="One task, with which peer holds which pieces.")
async def get_task(task_id: str, request: Request) -> TaskDetailView:
    return TaskDetailView.of(task_map(request).get(task_id))


# --- preheat jobs ------------------------------------------------------------------------------------


class PreheatRequest(BaseModel):
    """A preheat: fetch every blob of an image into the cluster."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(
        min_length=1,
        max_length=512,
        description="HOST[:PORT]/REPO[:TAG|@DIGEST]; the registry must be on the seeds' allow-list.",
        examples=["docker.io/library/python:3.11", "registry.example:5000/team/app@sha256:..."],
    )
    platform: str | None = Field(
        None,
        max_length=64,
        description="os/arch[/variant] to take from an index; omitted: every platform the index lists.",
        examples=["linux/amd64"],
    )
    username: str | None = Field(None, max_length=256, description="Registry credentials, never stored.")
    password: SecretStr | None = Field(None, max_length=4096)


class BlobView(BaseModel):
    """One blob of a job."""

    digest: str
    size: int
    media_type: str
    task_id: str
    state: str
    pieces_held: int
    piece_count: int | None
    error: str | None

    @classmethod
    def of(cls, progress: BlobProgress) -> BlobView:
        """The view of one blob's progress."""
        return cls(
            digest=progress.blob.digest,
            size=progress.blob.size,
            media_type=progress.blob.media_type,
            task_id=progress.task_id,
            state=progress.state.value,
            pieces_held=progress.pieces_held,
            piece_count=progress.piece_count,
            error=progress.error,
        )


class JobView(BaseModel):
    """A job as listed."""

    job_id: str
    kind: str
    image: str
    platform: str | None
    state: str
    error: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    @staticmethod
    def _fields_of(row: JobRow) -> dict[str, Any]:
        return {
            "job_id": row.job_id,
            "kind": row.kind,
            "image": row.image,
            "platform": row.platform,
            "state": row.state,
            "error": row.error,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
            "finished_at": row.finished_at,
        }

    @classmethod
    def of(cls, row: JobRow) -> JobView:
        """The listed view of a row."""
        return cls(**cls._fields_of(row))


class JobDetailView(JobView):
    """One job with its blobs and how far each is."""

    manifests: list[str]
    blobs_total: int
    blobs_available: int
    bytes_total: int
    bytes_available: int
    blobs: list[BlobView]

    @classmethod
    def with_progress(cls, row: JobRow, progress: list[BlobProgress]) -> JobDetailView:
        """The detailed view of a row and its blobs' progress."""
        available = [blob for blob in progress if blob.state.value == "available"]
        return cls(
            **cls._fields_of(row),
            manifests=row.manifests(),
            blobs_total=len(progress),
            blobs_available=len(available),
            bytes_total=sum(blob.blob.size for blob in progress),
            bytes_available=sum(blob.blob.size for blob in available),
            blobs=[BlobView.of(blob) for blob in progress],
        )


def job_service(request: Request) -> JobService:
    """The app's job service (created in the lifespan)."""
    jobs: JobService = request.app.state.jobs
    return jobs


@router.post(
    "/jobs/preheat",
    tags=["jobs"],
    status_code=202,
    dependencies=[Depends(require_write)],
    summary="Start a preheat job: the seeds fetch every layer of an image (or of every platform of an index).",
    responses={401: {"description": "No bearer token"}, 403: {"description": "Wrong bearer token"}},
)
async def create_preheat(body: PreheatRequest, request: Request, response: Response) -> JobDetailView:
    authorization = None
    if body.username is not None:
        password = body.password.get_secret_value() if body.password else ""
        authorization = Credentials(body.username, password).header
    spec = PreheatSpec.parse(body.image, body.platform, authorization)
    jobs = job_service(request)
    row = await jobs.create(spec)
    response.headers["Location"] = str(request.url_for("get_job", job_id=row.job_id))
    return JobDetailView.with_progress(row, [])


@router.get("/jobs", tags=["jobs"], summary="Jobs, newest first.")
async def list_jobs(request: Request, response: Response, page: Annotated[Page, Depends()]) -> list[JobView]:
    rows, total = await job_service(request).page(page.offset, page.per_page)
    page.headers(response, total)
    return [JobView.of(row) for row in rows]


@router.get("/jobs/{job_id}", tags=["jobs"], summary="One job, with each blob's progress.")
async def get_job(job_id: str, request: Request) -> JobDetailView:
    row, progress = await job_service(request).get(job_id)
    return JobDetailView.with_progress(row, progress)
