"""The piece map: which peer holds which piece of which task, folded from the TASKS stream.

The map is a fold over ``DAMSELFLY_TASKS`` (task registrations, piece announcements and failures, seed
completions), so a restarted scheduler rebuilds it by replaying the stream. Every fold is idempotent:
JetStream redelivers after a lost ack, and a replay meets events in stream order, which is not always
the order things happened in (a piece may be announced before its task is registered).

Alongside the tasks the map keeps what it learns about each parent from those events: the recent costs
of downloads *from* it, and when it last failed to serve. The evaluator turns that into verdicts.
"""

from __future__ import annotations

import enum
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from shared.errors import TaskNotFound
from shared.fsm import TransitionTable
from shared.schemas import (
    Event,
    PieceAnnounced,
    PieceFailed,
    PieceFailureReason,
    PieceSource,
    SeedFetchCompleted,
    TaskRegistered,
)

# Downloads remembered per parent: enough for a mean and a standard deviation, recent enough to track
# a parent whose link got worse (Dragonfly keeps a similar window of piece costs per peer).
COST_WINDOW = 20


class TaskState(enum.Enum):
    """Lifecycle of a task as the scheduler sees it."""

    PENDING = "pending"  # Known, not every piece held, no seed fetch in flight.
    SEEDING = "seeding"  # A seed fetch is in flight: exactly one at a time per task.
    AVAILABLE = "available"  # Every piece is held by at least one (announced, unblocked) peer.
    FAILED = "failed"  # The last seed fetch failed; a later request may start a new attempt.


class TaskEvent(enum.Enum):
    """What can happen to a task."""

    SEED_REQUESTED = "seed_requested"  # A seed fetch was published (or found already queued).
    SEED_SUCCEEDED = "seed_succeeded"  # SeedFetchCompleted(ok=True) for the attempt in flight.
    SEED_FAILED = "seed_failed"  # SeedFetchCompleted(ok=False) for the attempt in flight.
    PIECES_COMPLETE = "pieces_complete"  # The last missing piece got a holder.
    PIECES_INCOMPLETE = "pieces_incomplete"  # A piece lost its last holder (or a seed left gaps).


TASK_FSM: TransitionTable[TaskState, TaskEvent] = TransitionTable(
    "task",
    {
        (TaskState.PENDING, TaskEvent.SEED_REQUESTED): TaskState.SEEDING,
        (TaskState.PENDING, TaskEvent.PIECES_COMPLETE): TaskState.AVAILABLE,
        # While a fetch is in flight only its completion moves the task on, so SEEDING means exactly
        # "one fetch in flight" even when peers complete the piece map first.
        (TaskState.SEEDING, TaskEvent.SEED_SUCCEEDED): TaskState.AVAILABLE,
        (TaskState.SEEDING, TaskEvent.SEED_FAILED): TaskState.FAILED,
        # Holders of an available task left or were blocked: a new attempt is requested.
        (TaskState.AVAILABLE, TaskEvent.SEED_REQUESTED): TaskState.SEEDING,
        (TaskState.AVAILABLE, TaskEvent.PIECES_INCOMPLETE): TaskState.PENDING,
        (TaskState.FAILED, TaskEvent.SEED_REQUESTED): TaskState.SEEDING,
        # Peers may complete a task whose seed failed (pieces announced before the failure).
        (TaskState.FAILED, TaskEvent.PIECES_COMPLETE): TaskState.AVAILABLE,
    },
)


class PieceState(enum.Enum):
    """Whether some peer can serve a piece."""

    MISSING = "missing"  # Nobody announced it yet.
    HELD = "held"  # At least one peer announced it and is not blocked for the task.
    LOST = "lost"  # It was held, but every holder dropped it or was blocked (a bad piece).


class PieceEvent(enum.Enum):
    """What can happen to a piece."""

    ANNOUNCED = "announced"  # A holder in good standing announced it.
    LAST_HOLDER_GONE = "last_holder_gone"  # Its last good holder dropped it or was blocked.


PIECE_FSM: TransitionTable[PieceState, PieceEvent] = TransitionTable(
    "piece",
    {
        (PieceState.MISSING, PieceEvent.ANNOUNCED): PieceState.HELD,
        (PieceState.HELD, PieceEvent.ANNOUNCED): PieceState.HELD,
        (PieceState.HELD, PieceEvent.LAST_HOLDER_GONE): PieceState.LOST,
        (PieceState.LOST, PieceEvent.ANNOUNCED): PieceState.HELD,
    },
)


@dataclass
class ParentStats:
    """What the piece events say about one peer as a parent, across every task."""

    peer_id: str
    # Costs of downloads from this parent, oldest first, in milliseconds.
    costs: deque[float] = field(default_factory=lambda: deque(maxlen=COST_WINDOW))
    # Wall-clock seconds of the last cost sample (taken when it was folded: announcements carry no time).
    last_cost_at: float | None = None
    # Wall-clock seconds of the last connection/timeout/http failure reported against it.
    last_failure_at: float | None = None
    failures: Counter[str] = field(default_factory=Counter)


@dataclass
class PieceRecord:
    """One piece of a task: where it lies, its digest, and who holds it."""

    number: int
    range_start: int | None = None
    range_length: int | None = None
    digest: str | None = None
    # True once a holder that fetched it from the origin announced it: that digest is authoritative.
    digest_from_origin: bool = False
    # Holder peer id -> the digests it announced (a holder without the piece's digest is not offered).
    holders: dict[str, set[str]] = field(default_factory=dict)
    state: PieceState = PieceState.MISSING

    def apply(self, event: PieceEvent) -> None:
        """Move to the state ``event`` leads to (InvalidStateTransition if it is not allowed)."""
        self.state = PIECE_FSM.next_state(self.state, event)


@dataclass
class TaskRecord:
    """One task: its layout, its pieces, and its seed history."""

    task_id: str
    state: TaskState = TaskState.PENDING
    url: str | None = None
    digest: str | None = None
    content_length: int | None = None
    piece_size: int | None = None
    piece_count: int | None = None
    registered_by: str | None = None
    pieces: dict[int, PieceRecord] = field(default_factory=dict)
    # Parents that served a piece that failed its digest: never offered for this task again.
    blocked_parents: set[str] = field(default_factory=set)
    failures: Counter[str] = field(default_factory=Counter)
    # (piece, holder) pairs fetched from the origin: the task's back-to-source downloads.
    origin_downloads: set[tuple[int, str]] = field(default_factory=set)
    # Seed history. ``current_attempt`` is the attempt in flight (state SEEDING) or the last one.
    current_attempt: int | None = None
    completed_attempts: dict[int, bool] = field(default_factory=dict)
    attempts_seen: set[int] = field(default_factory=set)
    consecutive_seed_failures: int = 0
    # Wall-clock seconds, as folded (replayed events get the replay's time: a restart restarts backoffs).
    seed_requested_at: float | None = None
    # The (content length, piece size) the seed was told to use, until its task.registered says so:
    # a requester in between must get the same layout, not the one it would propose.
    requested_layout: tuple[int, int] | None = None
    last_seed_failure_at: float | None = None
    last_seed_error: str | None = None
    seen_failures: set[str] = field(default_factory=set, repr=False)
    seen_completions: set[tuple[int, str]] = field(default_factory=set, repr=False)

    def apply(self, event: TaskEvent) -> None:
        """Move to the state ``event`` leads to (InvalidStateTransition if it is not allowed)."""
        self.state = TASK_FSM.next_state(self.state, event)

    @property
    def layout_known(self) -> bool:
        """Whether the task was registered (size and piece layout known)."""
        return self.piece_count is not None

    @property
    def back_to_source_count(self) -> int:
        """How many piece downloads of this task went to the origin."""
        return len(self.origin_downloads)

    @property
    def seed_attempts(self) -> int:
        """How many seed fetch attempts were requested or completed."""
        return len(self.attempts_seen)

    @property
    def seed_in_flight(self) -> bool:
        """Whether a seed fetch is in flight (requested, not completed)."""
        return self.state is TaskState.SEEDING

    @property
    def next_attempt(self) -> int:
        """The attempt number a new seed fetch gets: one past every attempt seen so far."""
        return max(self.attempts_seen) + 1 if self.attempts_seen else 0

    def good_holders(self, piece: PieceRecord) -> list[str]:
        """Holders of ``piece`` that announced its digest and are not blocked for this task."""
        return sorted(
            holder
            for holder, digests in piece.holders.items()
            if piece.digest in digests and holder not in self.blocked_parents
        )

    def held_numbers(self) -> set[int]:
        """Numbers of the pieces some good holder has."""
        return {number for number, piece in self.pieces.items() if piece.state is PieceState.HELD}

    @property
    def is_complete(self) -> bool:
        """Whether every piece of the (registered) task has a good holder."""
        if self.piece_count is None:
            return False
        held = self.held_numbers()
        return all(number in held for number in range(self.piece_count))

    def pieces_by_holder(self) -> dict[str, list[int]]:
        """Good holder -> the numbers of the pieces it holds, ascending."""
        result: dict[str, list[int]] = {}
        for number in sorted(self.pieces):
            for holder in self.good_holders(self.pieces[number]):
                result.setdefault(holder, []).append(number)
        return result


class TaskMap:
    """Tasks by id and parent statistics, folded from TASKS events; read by assignments and the API."""

    def __init__(self) -> None:
        self._tasks: dict[str, TaskRecord] = {}
        self._parents: dict[str, ParentStats] = {}
        # Piece downloads from the origin over every task, kept as a running total for the metric.
        self.back_to_source_total = 0

    # --- reading --------------------------------------------------------------------------------

    def find(self, task_id: str) -> TaskRecord | None:
        """The task with this id, or None."""
        return self._tasks.get(task_id)

    def get(self, task_id: str) -> TaskRecord:
        """The task with this id, or TaskNotFound."""
        try:
            return self._tasks[task_id]
        except KeyError:
            raise TaskNotFound(f"no task {task_id!r}", task_id=task_id) from None

    def all(self) -> list[TaskRecord]:
        """Every task, sorted by id."""
        return [self._tasks[key] for key in sorted(self._tasks)]

    def pieces_per_holder(self) -> dict[str, int]:
        """Peer id -> how many pieces it holds across every task (the admin API's peer view)."""
        counts: Counter[str] = Counter()
        for task in self._tasks.values():
            for piece in task.pieces.values():
                counts.update(task.good_holders(piece))
        return dict(counts)

    def parent(self, peer_id: str) -> ParentStats:
        """What is known about ``peer_id`` as a parent (empty stats when nothing is)."""
        return self._parents.get(peer_id) or ParentStats(peer_id)

    def state_counts(self) -> Counter[TaskState]:
        """How many tasks are in each state."""
        return Counter(task.state for task in self._tasks.values())

    # --- folding --------------------------------------------------------------------------------

    def apply(self, event: Event, now: float | None = None) -> TaskRecord | None:
        """Fold one TASKS event at wall-clock ``now``; returns its task (None for other streams' events)."""
        if isinstance(event, TaskRegistered):
            return self.on_task_registered(event)
        if isinstance(event, PieceAnnounced):
            return self.on_piece_announced(event, now)
        if isinstance(event, PieceFailed):
            return self.on_piece_failed(event)
        if isinstance(event, SeedFetchCompleted):
            return self.on_seed_completed(event, now)
        return None

    def _task(self, task_id: str) -> TaskRecord:
        task = self._tasks.get(task_id)
        if task is None:
            task = TaskRecord(task_id=task_id)
            self._tasks[task_id] = task
        return task

    def _parent(self, peer_id: str) -> ParentStats:
        stats = self._parents.get(peer_id)
        if stats is None:
            stats = ParentStats(peer_id)
            self._parents[peer_id] = stats
        return stats

    def on_task_registered(self, event: TaskRegistered) -> TaskRecord:
        """A task's layout: the first registration wins (a task's layout never changes)."""
        task = self._task(event.task_id)
        if task.piece_count is None:
            task.url = event.url
            task.digest = event.digest
            task.content_length = event.content_length
            task.piece_size = event.piece_size
            task.piece_count = event.piece_count
            task.registered_by = event.registered_by
            self._settle(task)
        return task

    def on_piece_announced(self, event: PieceAnnounced, now: float | None = None) -> TaskRecord:
        """A holder has a piece; the first announcement of a (piece, holder) also records its cost."""
        task = self._task(event.task_id)
        if task.piece_count is not None and event.piece_number >= task.piece_count:
            return task  # Outside the registered layout: a confused peer, nothing to serve.
        piece = task.pieces.get(event.piece_number)
        if piece is None:
            piece = PieceRecord(event.piece_number)
            task.pieces[event.piece_number] = piece
        from_origin = event.source is PieceSource.ORIGIN
        if piece.digest is None or (from_origin and not piece.digest_from_origin):
            # The origin's bytes define the piece; until a seed announces it, the first holder does.
            piece.digest = event.digest
            piece.range_start = event.range_start
            piece.range_length = event.range_length
            piece.digest_from_origin = from_origin
        digests = piece.holders.setdefault(event.holder, set())
        is_new = event.digest not in digests
        digests.add(event.digest)
        if from_origin and (event.piece_number, event.holder) not in task.origin_downloads:
            task.origin_downloads.add((event.piece_number, event.holder))
            self.back_to_source_total += 1
        if is_new and event.source is PieceSource.PEER and event.parent_id and event.cost_ms > 0:
            # A zero cost means "not measured" and would make any later sample look like an outlier.
            stats = self._parent(event.parent_id)
            stats.costs.append(event.cost_ms)
            stats.last_cost_at = time.time() if now is None else now
        self._refresh_pieces(task, [piece])
        return task

    def on_piece_failed(self, event: PieceFailed) -> TaskRecord:
        """A bad-parent report: block, cool down, or forget the holder, by reason."""
        task = self._task(event.task_id)
        key = event.msg_id()
        if key in task.seen_failures:
            return task
        task.seen_failures.add(key)
        task.failures[event.reason.value] += 1
        stats = self._parent(event.parent_id)
        stats.failures[event.reason.value] += 1
        if event.reason is PieceFailureReason.DIGEST_MISMATCH:
            # Served bytes that do not match the piece: nothing it holds of this task can be trusted.
            task.blocked_parents.add(event.parent_id)
            self._refresh_pieces(task, task.pieces.values())
        elif event.reason is PieceFailureReason.NOT_HELD:
            # The parent evicted the piece; it announces it again if it fetches it again.
            piece = task.pieces.get(event.piece_number)
            if piece is not None and piece.holders.pop(event.parent_id, None) is not None:
                self._refresh_pieces(task, [piece])
        else:
            # Timeouts, refused connections and HTTP errors say the host is unwell, not the data.
            # The report's own time is used so a replayed old failure does not bench anyone today.
            reported = event.reported_at.timestamp()
            if stats.last_failure_at is None or reported > stats.last_failure_at:
                stats.last_failure_at = reported
        return task

    def on_seed_completed(self, event: SeedFetchCompleted, now: float | None = None) -> TaskRecord:
        """A seed fetch finished; the first completion of the attempt in flight decides its outcome."""
        task = self._task(event.task_id)
        key = (event.attempt, event.seed_id)
        if key in task.seen_completions:
            return task
        task.seen_completions.add(key)
        task.attempts_seen.add(event.attempt)
        stale = task.current_attempt is not None and event.attempt < task.current_attempt
        if stale or event.attempt in task.completed_attempts:
            # An older attempt, or a second seed finishing the same job: the outcome is already known.
            return task
        task.completed_attempts[event.attempt] = event.ok
        if not task.seed_in_flight:
            # The request was made by another replica or before a restart (requests live in the
            # SEED_JOBS work queue, not in this stream): a completion proves it was made.
            task.apply(TaskEvent.SEED_REQUESTED)
        task.current_attempt = event.attempt
        if event.ok:
            task.consecutive_seed_failures = 0
            task.last_seed_error = None
            if event.content_length is not None and task.content_length is None:
                task.content_length = event.content_length
            task.apply(TaskEvent.SEED_SUCCEEDED)
        else:
            task.consecutive_seed_failures += 1
            task.last_seed_failure_at = time.time() if now is None else now
            task.last_seed_error = event.error or "seed fetch failed"
            task.apply(TaskEvent.SEED_FAILED)
        self._settle(task)
        return task

    def begin_seed(
        self,
        task_id: str,
        attempt: int,
        *,
        url: str | None = None,
        digest: str | None = None,
        now: float | None = None,
        layout: tuple[int, int] | None = None,
    ) -> TaskRecord:
        """Record that a seed fetch for ``attempt`` is in flight (published by us, or found queued), and
        the ``layout`` (content length, piece size) it was asked to cut the blob in."""
        task = self._task(task_id)
        if layout is not None and task.requested_layout is None:
            task.requested_layout = layout
        if task.url is None:
            task.url = url
        if task.digest is None:
            task.digest = digest
        task.attempts_seen.add(attempt)
        task.current_attempt = attempt
        task.seed_requested_at = time.time() if now is None else now
        if not task.seed_in_flight:
            task.apply(TaskEvent.SEED_REQUESTED)
        return task

    # --- derived state --------------------------------------------------------------------------

    def _refresh_pieces(self, task: TaskRecord, pieces: Iterable[PieceRecord]) -> None:
        """Bring each piece's state in line with its good holders, then the task's with its pieces."""
        for piece in pieces:
            has_holder = bool(task.good_holders(piece))
            if has_holder:
                piece.apply(PieceEvent.ANNOUNCED)
            elif piece.state is PieceState.HELD:
                piece.apply(PieceEvent.LAST_HOLDER_GONE)
        self._settle(task)

    def _settle(self, task: TaskRecord) -> None:
        """Fire the completeness events the piece map implies (never while a seed fetch is in flight)."""
        if task.state in (TaskState.PENDING, TaskState.FAILED) and task.is_complete:
            task.apply(TaskEvent.PIECES_COMPLETE)
        elif task.state is TaskState.AVAILABLE and not task.is_complete:
            task.apply(TaskEvent.PIECES_INCOMPLETE)
