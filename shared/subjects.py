"""The subject catalogue and the JetStream streams that hold them: every subject in one place.

Subjects are versioned (``damselfly.v1.…``) so a v2 schema can run beside v1 during an upgrade. The
last token of most subjects is an id (peer or task), which lets a stream keep "the last message per
peer" and lets a consumer filter one task's pieces without decoding anything.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

PREFIX = "damselfly.v1"

PEER_REGISTERED = f"{PREFIX}.peer.registered"
PEER_HEARTBEAT = f"{PREFIX}.peer.heartbeat"
PEER_LEFT = f"{PREFIX}.peer.left"
TASK_REGISTERED = f"{PREFIX}.task.registered"
PIECE_ANNOUNCED = f"{PREFIX}.piece.announced"
PIECE_FAILED = f"{PREFIX}.piece.failed"
SEED_FETCH_REQUESTED = f"{PREFIX}.seed.fetch.requested"
SEED_FETCH_COMPLETED = f"{PREFIX}.seed.fetch.completed"
# Core NATS (not stored): the scheduler tells the seed working on a task which pieces peers wait for.
SEED_PRIORITY = f"{PREFIX}.seed.priority"
# Core NATS request/reply (not stored): a peer asks the scheduler where to get pieces from.
ASSIGNMENT_REQUEST = f"{PREFIX}.scheduler.assign"
# Core NATS request/reply: the scheduler asks a seed-fetcher to resolve an image to blobs (preheat).
IMAGE_RESOLVE_REQUEST = f"{PREFIX}.seed.resolve"


def for_id(base: str, ident: str) -> str:
    """``base`` with an id appended as its last token (peer id or task id)."""
    if not ident or any(ch in ident for ch in " .*>\t\r\n"):
        raise ValueError(f"not usable as a subject token: {ident!r}")
    return f"{base}.{ident}"


class Retention(enum.Enum):
    """JetStream retention policies used here."""

    LIMITS = "limits"  # Keep until age/size limits: event history that state is rebuilt from.
    WORK_QUEUE = "workqueue"  # Keep until acknowledged once: jobs for exactly one worker.


@dataclass(frozen=True)
class StreamSpec:
    """A stream as the services declare it (idempotently, at every start and reconnect)."""

    name: str
    subjects: tuple[str, ...]
    retention: Retention
    description: str
    max_msgs_per_subject: int = -1
    duplicate_window_seconds: float = 120.0
    # Filled from config at declaration time: replicas, max age and max bytes.
    extra: dict[str, object] = field(default_factory=dict)


PEERS_STREAM = StreamSpec(
    name="DAMSELFLY_PEERS",
    subjects=(f"{PREFIX}.peer.>",),
    retention=Retention.LIMITS,
    description="Peer lifecycle; the last registration, heartbeat and leave of each peer.",
    # One message per subject, and every subject ends in a peer id: the stream is the peer table.
    max_msgs_per_subject=1,
)

TASKS_STREAM = StreamSpec(
    name="DAMSELFLY_TASKS",
    subjects=(f"{PREFIX}.task.>", f"{PREFIX}.piece.>", f"{PREFIX}.seed.fetch.completed.>"),
    retention=Retention.LIMITS,
    description="Tasks, piece announcements and failures, seed completions: the piece map's history.",
)

SEED_JOBS_STREAM = StreamSpec(
    name="DAMSELFLY_SEED_JOBS",
    subjects=(SEED_FETCH_REQUESTED,),
    retention=Retention.WORK_QUEUE,
    description="Back-to-source jobs, each taken by exactly one seed-fetcher.",
    # A job for a task is published with the msg id 'seed.fetch:<task>:<attempt>': many peers asking at once
    # within this window make one job.
    duplicate_window_seconds=600.0,
)

ALL_STREAMS = (PEERS_STREAM, TASKS_STREAM, SEED_JOBS_STREAM)


class DeliverFrom(enum.Enum):
    """Where a consumer starts reading its stream."""

    ALL = "all"
    NEW = "new"
    LAST_PER_SUBJECT = "last_per_subject"


@dataclass(frozen=True)
class ConsumerSpec:
    """A pull consumer: durable (shared work, survives restarts) or ephemeral (per-process replay)."""

    stream: StreamSpec
    filter_subjects: tuple[str, ...]
    durable: str | None = None
    deliver_from: DeliverFrom = DeliverFrom.ALL
    ack_wait_seconds: float = 30.0
    max_deliver: int = 10
    max_ack_pending: int = 1000
    batch: int = 64
    # Acks are confirmed by the server (ack_sync) where losing one would redo expensive work.
    confirm_ack: bool = False
    # Redelivery delays for nak'd messages, by delivery count (last one repeats).
    nak_delays_seconds: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0)
    # Messages handled at once. 1 keeps stream order (folds need it); jobs that wait on the network
    # (a seed fetching a layer, or idling for a lazy reader's next range) must not queue behind each other.
    concurrency: int = 1
    description: str = ""


SEED_FETCH_CONSUMER = ConsumerSpec(
    stream=SEED_JOBS_STREAM,
    filter_subjects=(SEED_FETCH_REQUESTED,),
    durable="seed-fetchers",
    # Short, because a working fetcher keeps the job alive with in-progress reminders: a killed one's job
    # is redelivered (and resumed) this soon after it died.
    ack_wait_seconds=15.0,
    max_deliver=20,
    max_ack_pending=8,
    batch=1,
    confirm_ack=True,
    concurrency=8,
    description="Seed fetch jobs, shared by every seed-fetcher.",
)
