"""Preheat jobs: fetch every blob of an image into the cluster before anyone pulls it.

A job resolves the image (a manifest, or an index followed to one or every platform) through a seed,
since only seeds talk to origins, then asks for one seed fetch per blob the cluster does not hold yet,
through the same path assignments use, so a preheat and a pull of the same layer make one fetch. A
job's progress is read from the piece map, which every scheduler replica folds from the bus, so any
replica can answer for a job another one started; the job itself is a row in the database.

States::

    PENDING --resolve--> RESOLVING --resolved--> RUNNING --blobs available--> SUCCEEDED
                             |                      |
                             +------failed----------+-----------------------> FAILED
"""

from __future__ import annotations

import asyncio
import enum
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime

import orjson
from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Field, Session, SQLModel, col, select

from services.piece_scheduler.assignment import AssignmentService, SeedDecision, SeedJob
from services.piece_scheduler.task_map import TaskMap, TaskState
from shared.bus import Bus
from shared.errors import DamselflyError, InvalidRequest, NotFound
from shared.fsm import TransitionTable
from shared.oci.manifest import Platform
from shared.oci.reference import RegistryRef, parse_reference
from shared.schemas import ImageResolveReply, ImageResolveRequest, ResolvedBlob
from shared.schemas.events import utcnow
from shared.tasks import piece_size_for, task_id_for_digest

logger = logging.getLogger(__name__)


class JobState(enum.Enum):
    """Lifecycle of a preheat job."""

    PENDING = "pending"  # Accepted, not started.
    RESOLVING = "resolving"  # A seed is reading the image's manifests.
    RUNNING = "running"  # Seed fetches requested; waiting for every blob to be held.
    SUCCEEDED = "succeeded"  # Every blob is held by the cluster.
    FAILED = "failed"  # Resolution failed, or a blob's seed fetch did.


class JobEvent(enum.Enum):
    """What can happen to a job."""

    RESOLVE = "resolve"
    RESOLVED = "resolved"
    COMPLETED = "completed"
    FAILED = "failed"


JOB_FSM: TransitionTable[JobState, JobEvent] = TransitionTable(
    "job",
    {
        (JobState.PENDING, JobEvent.RESOLVE): JobState.RESOLVING,
        # A scheduler restarted mid-resolution resolves again (the seed fetches are idempotent).
        (JobState.RESOLVING, JobEvent.RESOLVE): JobState.RESOLVING,
        (JobState.RESOLVING, JobEvent.RESOLVED): JobState.RUNNING,
        (JobState.RESOLVING, JobEvent.FAILED): JobState.FAILED,
        (JobState.RUNNING, JobEvent.COMPLETED): JobState.SUCCEEDED,
        (JobState.RUNNING, JobEvent.FAILED): JobState.FAILED,
    },
)

TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED})


class JobRow(SQLModel, table=True):
    """One job as stored: what was asked, how far it got, and the blobs it resolved to."""

    __tablename__ = "jobs"

    job_id: str = Field(primary_key=True, max_length=64)
    kind: str = Field(default="preheat", max_length=32)
    image: str = Field(max_length=512)
    platform: str | None = Field(default=None, max_length=64)
    state: str = Field(index=True, max_length=16)
    error: str | None = None
    manifests_json: str = "[]"
    blobs_json: str = "[]"
    created_at: datetime = Field(index=True)
    updated_at: datetime
    finished_at: datetime | None = None

    @property
    def job_state(self) -> JobState:
        """The row's state as the enum."""
        return JobState(self.state)

    def blobs(self) -> list[ResolvedBlob]:
        """The blobs the image resolved to (empty before resolution)."""
        return [ResolvedBlob.model_validate(blob) for blob in orjson.loads(self.blobs_json)]

    def manifests(self) -> list[str]:
        """Digests of the image manifests resolved."""
        return list(orjson.loads(self.manifests_json))


class BlobState(enum.Enum):
    """Where one blob of a job stands, read from the piece map."""

    PENDING = "pending"  # Its seed fetch is queued; no piece yet.
    FETCHING = "fetching"  # The seed is fetching it.
    AVAILABLE = "available"  # Every piece is held in the cluster.
    FAILED = "failed"  # The last seed fetch of it failed.


@dataclass(frozen=True)
class BlobProgress:
    """One blob of a job and its state."""

    blob: ResolvedBlob
    task_id: str
    state: BlobState
    pieces_held: int
    piece_count: int | None
    error: str | None


@dataclass(frozen=True)
class PreheatSpec:
    """What a preheat asks for, checked before a job is made."""

    image: str
    platform: str | None
    authorization: str | None

    @classmethod
    def parse(cls, image: str, platform: str | None, authorization: str | None) -> PreheatSpec:
        """Validate the reference and platform (InvalidRequest naming the problem)."""
        ref = parse_reference(image)
        if not isinstance(ref, RegistryRef):
            raise InvalidRequest(f"{image!r} is not a registry reference (HOST[:PORT]/REPO[:TAG|@DIGEST])")
        if platform is not None:
            Platform.parse(platform)
        return cls(image=str(ref), platform=platform, authorization=authorization)


class JobService:
    """Creates, runs and reports preheat jobs."""

    def __init__(
        self,
        *,
        engine: Engine,
        tasks: TaskMap,
        assignments: AssignmentService,
        bus: Bus,
        resolve_timeout: float,
    ) -> None:
        self.engine = engine
        self.tasks = tasks
        self.assignments = assignments
        self.bus = bus
        self.resolve_timeout = resolve_timeout
        self._running: set[asyncio.Task[None]] = set()

    # --- creating and running -------------------------------------------------------------------

    async def create(self, spec: PreheatSpec) -> JobRow:
        """Store a new job and start it in the background."""
        now = utcnow()
        row = JobRow(
            job_id=uuid.uuid4().hex,
            image=spec.image,
            platform=spec.platform,
            state=JobState.PENDING.value,
            created_at=now,
            updated_at=now,
        )
        await self._save(row)
        self._start(row, spec.authorization)
        logger.info("preheat job created", extra={"job_id": row.job_id, "image": row.image})
        return row

    async def resume(self) -> int:
        """Start again the jobs a previous scheduler left unresolved; returns how many.

        Credentials are never stored, so a resumed job resolves anonymously.
        """
        rows = await asyncio.to_thread(self._unresolved)
        for row in rows:
            self._start(row, None)
        return len(rows)

    def _start(self, row: JobRow, authorization: str | None) -> None:
        task = asyncio.create_task(self._run(row, authorization), name=f"preheat-{row.job_id}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def close(self) -> None:
        """Stop jobs still resolving (they resume at the next start)."""
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)

    async def _run(self, row: JobRow, authorization: str | None) -> None:
        self._move(row, JobEvent.RESOLVE)
        await self._save(row)
        try:
            reply = await self.bus.request(
                ImageResolveRequest(
                    image=row.image, platform=row.platform, authorization=authorization, job_id=row.job_id
                ),
                ImageResolveReply,
                timeout=self.resolve_timeout,
            )
        except DamselflyError as exc:
            logger.warning("preheat job failed to resolve", extra={"job_id": row.job_id, "error": exc.message})
            self._move(row, JobEvent.FAILED, error=f"resolving {row.image}: {exc.message}")
            await self._save(row)
            return
        row.manifests_json = orjson.dumps(reply.manifests).decode()
        row.blobs_json = orjson.dumps([blob.model_dump(mode="json") for blob in reply.blobs]).decode()
        requested_by = f"preheat-{row.job_id[:16]}"
        for blob in reply.blobs:
            await self._seed(blob, authorization, requested_by)
        self._move(row, JobEvent.RESOLVED)
        await self._save(row)
        logger.info("preheat job running", extra={"job_id": row.job_id, "blobs": len(reply.blobs)})

    async def _seed(self, blob: ResolvedBlob, authorization: str | None, requested_by: str) -> None:
        task_id = task_id_for_digest(blob.digest)
        task = self.tasks.find(task_id)
        if task is not None and task.is_complete:
            return  # Already in the cluster: nothing to fetch.
        decision, _ = await self.assignments.request_seed(
            SeedJob(
                task_id=task_id,
                url=blob.url,
                digest=blob.digest,
                content_length=blob.size,
                piece_size=piece_size_for(blob.size),
                authorization=authorization,
                requested_by=requested_by,
            )
        )
        if decision is SeedDecision.BACKING_OFF:
            # The blob's last fetch failed moments ago: the job reports that failure rather than waiting.
            logger.info("preheat blob is backing off", extra={"task_id": task_id})

    # --- reporting ------------------------------------------------------------------------------

    def progress(self, row: JobRow) -> list[BlobProgress]:
        """Each resolved blob of ``row`` and its state in the piece map."""
        out = []
        for blob in row.blobs():
            task_id = task_id_for_digest(blob.digest)
            task = self.tasks.find(task_id)
            error = None
            if task is None:
                state, held, count = BlobState.PENDING, 0, None
            else:
                held, count = len(task.held_numbers()), task.piece_count
                if task.is_complete:
                    state = BlobState.AVAILABLE
                elif task.state is TaskState.FAILED:
                    state, error = BlobState.FAILED, task.last_seed_error or "seed fetch failed"
                elif task.seed_in_flight and held:
                    state = BlobState.FETCHING
                else:
                    state = BlobState.PENDING
            out.append(BlobProgress(blob, task_id, state, held, count, error))
        return out

    async def get(self, job_id: str) -> tuple[JobRow, list[BlobProgress]]:
        """A job and its blobs' progress; a running job that has finished is recorded as such."""
        row = await asyncio.to_thread(self._load, job_id)
        progress = self.progress(row)
        await self._settle(row, progress)
        return row, progress

    async def _settle(self, row: JobRow, progress: list[BlobProgress]) -> None:
        if row.job_state is not JobState.RUNNING:
            return
        failed = [blob for blob in progress if blob.state is BlobState.FAILED]
        if failed:
            first = failed[0]
            self._move(row, JobEvent.FAILED, error=f"blob {first.blob.digest}: {first.error}")
        elif all(blob.state is BlobState.AVAILABLE for blob in progress):
            self._move(row, JobEvent.COMPLETED)
        else:
            return
        await self._save(row)
        logger.info("preheat job %s", row.state, extra={"job_id": row.job_id})

    async def settle_running(self) -> None:
        """Record the end of every running job whose blobs have all arrived (or failed)."""
        for row in await asyncio.to_thread(self._in_state, JobState.RUNNING):
            await self._settle(row, self.progress(row))

    async def page(self, offset: int, limit: int) -> tuple[list[JobRow], int]:
        """Jobs newest first, and how many there are."""
        return await asyncio.to_thread(self._page, offset, limit)

    # --- storage --------------------------------------------------------------------------------

    @staticmethod
    def _move(row: JobRow, event: JobEvent, error: str | None = None) -> None:
        state = JOB_FSM.next_state(row.job_state, event)
        now = utcnow()
        row.state = state.value
        row.updated_at = now
        if error is not None:
            row.error = error[:2000]
        if state in TERMINAL:
            row.finished_at = now

    async def _save(self, row: JobRow) -> None:
        await asyncio.to_thread(self._save_sync, row)

    def _save_sync(self, row: JobRow) -> None:
        with Session(self.engine, expire_on_commit=False) as session:
            session.merge(row)
            session.commit()

    def _load(self, job_id: str) -> JobRow:
        with Session(self.engine, expire_on_commit=False) as session:
            row = session.get(JobRow, job_id)
            if row is None:
                raise NotFound(f"no job {job_id!r}", job_id=job_id)
            return row

    def _in_state(self, *states: JobState) -> list[JobRow]:
        with Session(self.engine, expire_on_commit=False) as session:
            statement = select(JobRow).where(col(JobRow.state).in_([state.value for state in states]))
            return list(session.exec(statement).all())

    def _unresolved(self) -> list[JobRow]:
        return self._in_state(JobState.PENDING, JobState.RESOLVING)

    def _page(self, offset: int, limit: int) -> tuple[list[JobRow], int]:
        with Session(self.engine, expire_on_commit=False) as session:
            total = session.exec(select(func.count()).select_from(JobRow)).one()
            statement = (
                select(JobRow).order_by(col(JobRow.created_at).desc(), col(JobRow.job_id)).offset(offset).limit(limit)
            )
            return list(session.exec(statement).all()), int(total)


async def settle_jobs(jobs: JobService, interval: float) -> None:
    """Record finished jobs even when nobody asks for their status, forever."""
    while True:
        await asyncio.sleep(interval)
        try:
            await jobs.settle_running()
        except DamselflyError as exc:
            logger.warning("settling jobs failed: %s", exc.message)
