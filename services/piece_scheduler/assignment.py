"""The assignment service: a peer asks where to fetch a task's pieces; the scheduler ranks parents.

Served over core NATS request/reply on ``damselfly.v1.scheduler.assign`` in the queue group
``schedulers``, so replicas share the requests. For each wanted piece that some parent in good
standing holds, the reply lists up to ``max_parents_per_piece`` parents, best first (see
:mod:`services.piece_scheduler.evaluator`).

When a wanted piece has no parent (or the task is unknown) the scheduler requests a seed fetch, the
only way back to source, and makes sure there is exactly one per task:

* within a replica, a lock and the task's state: SEEDING means a fetch is in flight, so nobody
  publishes another;
* across replicas and restarts, the job's ``Nats-Msg-Id`` ``seed.fetch:<task>:<attempt>``: JetStream
  keeps one job per id within the SEED_JOBS stream's ten-minute window. Attempt numbers are derived
  from the TASKS stream (one past every attempt completed), so every replica picks the same one, and a
  failed attempt is followed by a new number.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from dataclasses import dataclass

from services.piece_scheduler.config import SchedulerConfig
from services.piece_scheduler.evaluator import Candidate, Evaluator, Exclusion, Requester, Verdict
from services.piece_scheduler.metrics import SchedulerMetrics
from services.piece_scheduler.peer_registry import PeerRegistry, PeerState
from services.piece_scheduler.replay import StreamReplay
from services.piece_scheduler.task_map import TaskMap, TaskRecord, TaskState
from shared import subjects
from shared.bus import Bus
from shared.errors import InvalidRequest
from shared.schemas import (
    AssignmentReply,
    AssignmentRequest,
    ParentCandidate,
    PieceAssignment,
    SeedFetchRequested,
    SeedPriority,
    TaskStatus,
)
from shared.tasks import piece_count, piece_size_for, ranged_piece_size_for

logger = logging.getLogger(__name__)

SUBJECT = subjects.ASSIGNMENT_REQUEST
# An on-demand seed job names at most this many pieces (the schema's limit); hints add the rest.
MAX_ON_DEMAND_PIECES = 1024
QUEUE_GROUP = "schedulers"


@dataclass(frozen=True)
class SeedJob:
    """What a seed fetch needs to know, from an assignment request or a preheat job."""

    task_id: str
    url: str
    digest: str | None
    content_length: int | None
    piece_size: int | None
    authorization: str | None
    requested_by: str
    pieces: tuple[int, ...] | None = None  # On demand: only these (None: the whole blob).


@dataclass(frozen=True)
class Layout:
    """A task's size and piece layout."""

    content_length: int
    piece_size: int
    piece_count: int


class SeedDecision(enum.Enum):
    """What an assignment that needs the origin did about it."""

    PUBLISHED = "published"  # This request made the job.
    QUEUED = "queued"  # The job was already queued (another replica, or before a restart).
    IN_FLIGHT = "in_flight"  # This replica knows a fetch is in flight.
    BACKING_OFF = "backing_off"  # The last attempt failed recently; the next one waits.


class AssignmentService:
    """Answers AssignmentRequests from the peer table and the piece map; requests seed fetches."""

    def __init__(
        self,
        *,
        tasks: TaskMap,
        peers: PeerRegistry,
        bus: Bus,
        config: SchedulerConfig,
        evaluator: Evaluator | None = None,
        metrics: SchedulerMetrics | None = None,
        replays: tuple[StreamReplay, ...] = (),
    ) -> None:
        self.tasks = tasks
        self.peers = peers
        self.bus = bus
        self.config = config
        self.evaluator = evaluator or Evaluator()
        self.metrics = metrics
        self.replays = replays
        # Serialises "is a fetch in flight? if not, publish one" so concurrent requests make one job.
        self._seed_lock = asyncio.Lock()

    async def serve(self) -> None:
        """Subscribe to assignment requests in the schedulers' queue group."""
        await self.bus.serve(SUBJECT, AssignmentRequest, self, queue=QUEUE_GROUP)

    async def __call__(self, request: AssignmentRequest) -> AssignmentReply:
        """Answer one request (the responder ``Bus.serve`` calls)."""
        started = time.perf_counter()
        reply = await self.assign(request)
        if self.metrics:
            self.metrics.assignments.labels(status=reply.status.value).inc()
            self.metrics.assignment_seconds.observe(time.perf_counter() - started)
        return reply

    async def assign(self, request: AssignmentRequest) -> AssignmentReply:
        """The reply to ``request``: layout, ranked parents per piece, and the seed fetch if needed."""
        for replay in self.replays:
            if not await replay.wait(self.config.replay_wait_seconds):
                logger.warning("answering %s before %s is replayed", request.task_id, replay.stream.name)
        now = time.time()
        task = self.tasks.find(request.task_id)
        layout = self._layout(task, request)
        wanted, wanted_known = self._wanted(task, request, layout)
        verdicts = self._verdicts(task, self._requester(request.peer_id), layout, now)

        assignments: list[PieceAssignment] = []
        missing: list[int] = []
        truncated = False
        for number in wanted:
            piece = task.pieces.get(number) if task else None
            if task is None or piece is None or piece.digest is None or piece.range_start is None:
                missing.append(number)
                continue
            ranked = self.evaluator.rank(
                (verdicts[holder] for holder in task.good_holders(piece) if holder in verdicts),
                self.config.max_parents_per_piece,
            )
            if not ranked:
                missing.append(number)
            elif len(assignments) >= self.config.max_pieces_per_reply:
                truncated = True
            else:
                assignments.append(
                    PieceAssignment(
                        piece_number=number,
                        range_start=piece.range_start,
                        range_length=piece.range_length or 0,
                        digest=piece.digest,
                        parents=[self._parent(verdict) for verdict in ranked],
                    )
                )

        # Without a layout the seed is what will tell the rest of the pieces, unless it already finished
        # (then a task that was never registered is the seed's bug, and asking again would loop).
        seeded = task is not None and any(task.completed_attempts.values())
        lacking = bool(missing) or (not wanted_known and not seeded)
        decision: SeedDecision | None = None
        backoff_left = 0.0
        if lacking:
            # A requester that names its pieces (a lazy reader's ranges) gets an on-demand fetch of those:
            # the origin sends what is read, not the whole layer.
            on_demand = missing[:MAX_ON_DEMAND_PIECES] if request.pieces_wanted is not None and missing else None
            decision, backoff_left = await self._request_seed(request, layout, on_demand)
            task = self.tasks.find(request.task_id)
            if missing:
                # The seed fetches lowest piece first; a reader deep in a layer would wait for it to get
                # there. Tell the seed in flight which pieces are awaited, in the peer's order, and whether
                # this peer wants the whole blob (which turns an on-demand fetch into a full one).
                hint = SeedPriority(task_id=request.task_id, pieces=missing[:64], whole=request.pieces_wanted is None)
                await self.bus.notify(hint)

        status, error = self._status(task, decision, lacking)
        retry_after = 0
        if decision is SeedDecision.BACKING_OFF:
            retry_after = max(self.config.retry_after_ms, math.ceil(backoff_left * 1000))
        elif decision is not None or truncated:
            retry_after = self.config.retry_after_ms
        return AssignmentReply(
            task_id=request.task_id,
            status=status,
            content_length=layout.content_length if layout else request.content_length,
            piece_size=layout.piece_size if layout else None,
            piece_count=layout.piece_count if layout else None,
            pieces=assignments,
            seed_requested=decision is SeedDecision.PUBLISHED,
            retry_after_ms=retry_after,
            error=error,
        )

    # --- pieces and parents ---------------------------------------------------------------------

    @staticmethod
    def _layout(task: TaskRecord | None, request: AssignmentRequest) -> Layout | None:
        """The registered layout, else the one the seed will be told to use for a known length: the
        requester's proposed piece size (a range reader's small pieces), else the usual one."""
        if task is not None and task.piece_count is not None and task.piece_size and task.content_length is not None:
            return Layout(task.content_length, task.piece_size, task.piece_count)
        if task is not None and task.requested_layout is not None:
            length, size = task.requested_layout
            return Layout(length, size, piece_count(length, size))
        if request.content_length is not None:
            size = piece_size_for(request.content_length)
            if request.piece_size:
                # A proposal never makes more pieces than a range reader's own rule would: a tiny size on a
                # huge blob would give the piece map (and every announcement stream) millions of entries.
                size = max(request.piece_size, ranged_piece_size_for(request.content_length))
            return Layout(request.content_length, size, piece_count(request.content_length, size))
        return None

    @staticmethod
    def _wanted(task: TaskRecord | None, request: AssignmentRequest, layout: Layout | None) -> tuple[list[int], bool]:
        """The piece numbers to assign, and whether they are all of what the requester wants."""
        if (
            request.pieces_wanted is not None
            and request.piece_size
            and layout
            and request.piece_size != layout.piece_size
        ):
            # Numbered for the layout the requester proposed, not the one registered: they mean other bytes.
            # The reply's layout tells the requester how to name them.
            return [], True
        if request.pieces_wanted is not None:
            # The requester's order is its priority (the pieces a reader waits for come first): keep it.
            wanted = list(dict.fromkeys(request.pieces_wanted))
            highest = max(wanted, default=-1)
            if layout is not None and highest >= layout.piece_count:
                raise InvalidRequest(
                    f"piece {highest} out of range (task has {layout.piece_count} pieces)",
                    task_id=request.task_id,
                )
            return wanted, True
        # "Every piece the peer lacks": those it has announced are left out.
        held = set(task.pieces_by_holder().get(request.peer_id, ())) if task else set()
        if layout is not None:
            return [number for number in range(layout.piece_count) if number not in held], True
        # No layout yet: offer what is announced, and the seed will tell the rest.
        known = sorted(task.pieces) if task else []
        return [number for number in known if number not in held], False

    def _requester(self, peer_id: str) -> Requester:
        record = self.peers.find(peer_id)
        info = record.info if record else None
        return Requester(peer_id=peer_id, idc=info.idc if info else "", location=info.location if info else "")

    def _verdicts(
        self, task: TaskRecord | None, requester: Requester, layout: Layout | None, now: float
    ) -> dict[str, Verdict]:
        """Every holder of the task judged once: a score does not depend on the piece."""
        if task is None:
            return {}
        by_holder = task.pieces_by_holder()
        piece_total = layout.piece_count if layout else max((len(n) for n in by_holder.values()), default=0)
        verdicts: dict[str, Verdict] = {}
        for peer_id, numbers in by_holder.items():
            record = self.peers.find(peer_id)
            stats = self.tasks.parent(peer_id)
            candidate = Candidate(
                peer_id=peer_id,
                state=record.state if record else PeerState.PENDING,
                info=record.info if record else None,
                upload_slots_in_use=record.upload_slots_in_use if record else 0,
                pieces_held=len(numbers),
                costs=tuple(stats.costs),
                last_cost_at=stats.last_cost_at,
                last_failure_at=stats.last_failure_at,
                blocked=peer_id in task.blocked_parents,
            )
            verdict = self.evaluator.judge(candidate, requester, piece_total, now)
            reason = verdict.exclusion
            # Being the requester is no fault of the parent's; every other reason is worth counting.
            if reason is not None and reason is not Exclusion.SELF and self.metrics:
                self.metrics.parents_skipped.labels(reason=reason.value).inc()
            verdicts[peer_id] = verdict
        return verdicts

    @staticmethod
    def _parent(verdict: Verdict) -> ParentCandidate:
        info = verdict.candidate.info
        assert info is not None  # Peers without info are hard-excluded by the evaluator.
        return ParentCandidate(
            peer_id=verdict.peer_id, upload_url=info.upload_url, score=round(verdict.score, 4), is_seed=info.is_seed
        )

    # --- back to source -------------------------------------------------------------------------

    def _backoff(self, task: TaskRecord) -> float:
        """Seconds to wait after the last failed attempt: doubling per consecutive failure, capped."""
        failures = task.consecutive_seed_failures
        if failures == 0:
            return 0.0
        base = self.config.seed_retry_backoff_seconds
        return float(min(base * 2 ** (failures - 1), self.config.seed_retry_backoff_max_seconds))

    async def _request_seed(
        self, request: AssignmentRequest, layout: Layout | None, pieces: list[int] | None
    ) -> tuple[SeedDecision, float]:
        """Publish the task's one seed fetch for an assignment that lacks pieces (``pieces``: on demand)."""
        task = self.tasks.find(request.task_id)
        return await self.request_seed(
            SeedJob(
                task_id=request.task_id,
                url=request.url,
                digest=request.digest or (task.digest if task else None),
                content_length=layout.content_length if layout else None,
                piece_size=layout.piece_size if layout else None,
                authorization=request.authorization,
                requested_by=request.peer_id,
                pieces=tuple(pieces) if pieces is not None else None,
            )
        )

    async def request_seed(self, job: SeedJob) -> tuple[SeedDecision, float]:
        """Publish the task's one seed fetch unless one is in flight or backing off.

        Returns what was decided, and with BACKING_OFF the seconds left before another attempt.
        """
        async with self._seed_lock:
            # Read the task again under the lock: the request before this one may have just started a fetch.
            task = self.tasks.find(job.task_id)
            now = time.time()
            if task is not None and task.seed_in_flight:
                started = task.seed_requested_at
                if started is not None and now - started < self.config.seed_fetch_timeout_seconds:
                    return SeedDecision.IN_FLIGHT, 0.0
                # A fetch that never completed (its job lost with a NATS store): ask for it again.
                attempt = task.current_attempt if task.current_attempt is not None else task.next_attempt
            else:
                if task is not None and task.last_seed_failure_at is not None:
                    left = task.last_seed_failure_at + self._backoff(task) - now
                    if left > 0:
                        return SeedDecision.BACKING_OFF, left
                attempt = task.next_attempt if task is not None else 0
            published = SeedFetchRequested(
                task_id=job.task_id,
                url=job.url,
                digest=job.digest,
                content_length=job.content_length,
                piece_size=job.piece_size,
                authorization=job.authorization,
                requested_by=job.requested_by,
                attempt=attempt,
                pieces=list(job.pieces) if job.pieces is not None else None,
            )
            ack = await self.bus.publish(published)
            layout = (
                (job.content_length, job.piece_size)
                if job.content_length is not None and job.piece_size is not None
                else None
            )
            self.tasks.begin_seed(job.task_id, attempt, url=job.url, digest=job.digest, now=now, layout=layout)
        decision = SeedDecision.QUEUED if ack.duplicate else SeedDecision.PUBLISHED
        if self.metrics:
            self.metrics.seed_fetches.labels(outcome="duplicate" if ack.duplicate else "published").inc()
        logger.info(
            "seed fetch %s",
            decision.value,
            extra={"task_id": job.task_id, "attempt": attempt, "requested_by": job.requested_by},
        )
        return decision, 0.0

    def _status(
        self, task: TaskRecord | None, decision: SeedDecision | None, lacking: bool
    ) -> tuple[TaskStatus, str | None]:
        """The reply's task status, and an error text when the origin failed."""
        held_any = task is not None and bool(task.held_numbers())
        if decision is SeedDecision.BACKING_OFF and task is not None:
            error = task.last_seed_error or "seed fetch failed"
            return TaskStatus.FAILED, f"seed fetch attempt {task.current_attempt} failed: {error}"
        if lacking:
            return (TaskStatus.SEEDING if held_any else TaskStatus.UNKNOWN), None
        if task is not None and task.is_complete:
            return TaskStatus.AVAILABLE, None
        if task is not None and task.state is TaskState.FAILED:
            return TaskStatus.FAILED, task.last_seed_error
        return (TaskStatus.SEEDING if held_any else TaskStatus.UNKNOWN), None
