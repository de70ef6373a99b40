"""Every message on the bus: one pydantic model per event, each with a name and a version.

The wire form is the model's JSON (orjson), with the event's name and version in the
``Damselfly-Event`` header (``peer.registered/1``) and in the subject (``damselfly.v1.…``). Models are
frozen and forbid unknown fields, so a producer built from a newer schema is rejected loudly (and its
message terminated) rather than half-read.
"""

from __future__ import annotations

import enum
import re
from datetime import UTC, datetime
from typing import Annotated, ClassVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared import subjects
from shared.errors import InvalidRequest, MalformedMessage
from shared.tasks import check_piece_size

# Task ids are sha256 hex (of the filtered URL or of the blob digest); peer ids are short slugs.
TaskId = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="sha256 hex of the task's key")]
PeerId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,128}$", description="Peer id: [A-Za-z0-9_-]{1,128}")]
Sha256Digest = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]
PieceDigest = Annotated[str, Field(pattern=r"^(sha256|blake3):[0-9a-f]{64}$")]
NonNegative = Annotated[int, Field(ge=0)]

_TASK_ID_RE = re.compile(r"^[0-9a-f]{64}$")


def utcnow() -> datetime:
    """The current time, timezone-aware (UTC)."""
    return datetime.now(UTC)


class Event(BaseModel):
    """Base of every bus message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ClassVar[str]
    version: ClassVar[int] = 1
    subject_base: ClassVar[str]

    def subject(self) -> str:
        """The subject this event is published on."""
        return self.subject_base

    def msg_id(self) -> str:
        """The ``Nats-Msg-Id``: equal for two publishes of the same fact, so JetStream keeps one."""
        raise NotImplementedError

    @classmethod
    def schema_tag(cls) -> str:
        """``name/version``, as carried in the ``Damselfly-Event`` header."""
        return f"{cls.name}/{cls.version}"

    def to_bytes(self) -> bytes:
        """The wire form."""
        return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def from_bytes(cls, data: bytes) -> Event:
        """Parse the wire form, raising MalformedMessage with the reason."""
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "<root>"
            raise MalformedMessage(f"{cls.schema_tag()}: {where}: {first['msg']}", schema=cls.schema_tag()) from exc


# --- peers -------------------------------------------------------------------------------------------


class PeerInfo(BaseModel):
    """What the scheduler needs to know to send other peers to this one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    peer_id: PeerId
    node_name: str = Field(min_length=1, max_length=253)
    ip: str = Field(min_length=1, max_length=64)
    upload_url: str = Field(description="Base URL of the peer's cache-store upload server.")
    proxy_url: str | None = Field(None, description="Base URL of the peer's registry-proxy, when it has one.")
    idc: str = ""
    location: str = Field("", description="'|'-separated location path, e.g. 'country|city|zone'.")
    is_seed: bool = False
    upload_slots: NonNegative = 50


class PeerRegistered(Event):
    """A peer joined (or rejoined after a restart)."""

    name = "peer.registered"
    subject_base = subjects.PEER_REGISTERED

    peer: PeerInfo
    registered_at: datetime = Field(default_factory=utcnow)

    def subject(self) -> str:
        return subjects.for_id(self.subject_base, self.peer.peer_id)

    def msg_id(self) -> str:
        return f"peer.registered:{self.peer.peer_id}:{self.registered_at.isoformat()}"


class PeerHeartbeat(Event):
    """A peer is alive; carries its current load."""

    name = "peer.heartbeat"
    subject_base = subjects.PEER_HEARTBEAT

    peer_id: PeerId
    sequence: NonNegative
    sent_at: datetime = Field(default_factory=utcnow)
    upload_slots_in_use: NonNegative = 0
    tasks_held: NonNegative = 0
    disk_free_bytes: NonNegative | None = None

    def subject(self) -> str:
        return subjects.for_id(self.subject_base, self.peer_id)

    def msg_id(self) -> str:
        return f"peer.heartbeat:{self.peer_id}:{self.sequence}:{self.sent_at.isoformat()}"


class LeaveReason(enum.Enum):
    """Why a peer left."""

    SHUTDOWN = "shutdown"
    EVICTED = "evicted"


class PeerLeft(Event):
    """A peer left: the scheduler stops sending others to it."""

    name = "peer.left"
    subject_base = subjects.PEER_LEFT

    peer_id: PeerId
    left_at: datetime = Field(default_factory=utcnow)
    reason: LeaveReason = LeaveReason.SHUTDOWN

    def subject(self) -> str:
        return subjects.for_id(self.subject_base, self.peer_id)

    def msg_id(self) -> str:
        return f"peer.left:{self.peer_id}:{self.left_at.isoformat()}"


# --- tasks and pieces --------------------------------------------------------------------------------


class TaskRegistered(Event):
    """A blob became a task: its size and piece layout are known."""

    name = "task.registered"
    subject_base = subjects.TASK_REGISTERED

    task_id: TaskId
    url: str = Field(description="The task's URL with filtered query parameters removed.")
    digest: Sha256Digest | None = None
    content_length: NonNegative
    piece_size: int = Field(gt=0)
    piece_count: NonNegative
    registered_by: PeerId

    def subject(self) -> str:
        return subjects.for_id(self.subject_base, self.task_id)

    def msg_id(self) -> str:
        return f"task.registered:{self.task_id}"


class PieceSource(enum.Enum):
    """Where the announcing peer got the piece from."""

    ORIGIN = "origin"
    PEER = "peer"


class PieceAnnounced(Event):
    """A peer holds a verified piece and can serve it."""

    name = "piece.announced"
    subject_base = subjects.PIECE_ANNOUNCED

    task_id: TaskId
    piece_number: NonNegative
    range_start: NonNegative
    range_length: NonNegative
    digest: PieceDigest
    holder: PeerId
    source: PieceSource = PieceSource.PEER
    parent_id: PeerId | None = Field(None, description="The parent it came from, when source is 'peer'.")
    cost_ms: float = Field(0.0, ge=0, description="How long the download of this piece took.")

    def subject(self) -> str:
        return subjects.for_id(self.subject_base, self.task_id)

    def msg_id(self) -> str:
        return f"piece.announced:{self.task_id}:{self.piece_number}:{self.holder}"


class PieceFailureReason(enum.Enum):
    """Why a piece download from a parent failed."""

    DIGEST_MISMATCH = "digest_mismatch"
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    HTTP_ERROR = "http_error"
    NOT_HELD = "not_held"


class PieceFailed(Event):
    """A bad-parent report: a piece could not be had, or was corrupt, from this parent."""

    name = "piece.failed"
    subject_base = subjects.PIECE_FAILED

    task_id: TaskId
    piece_number: NonNegative
    parent_id: PeerId
    reporter_id: PeerId
    reason: PieceFailureReason
    detail: str = Field("", max_length=1000)
    reported_at: datetime = Field(default_factory=utcnow)

    def subject(self) -> str:
        return subjects.for_id(self.subject_base, self.task_id)

    def msg_id(self) -> str:
        return (
            f"piece.failed:{self.task_id}:{self.piece_number}:{self.parent_id}:{self.reporter_id}:"
            f"{self.reported_at.isoformat()}"
        )


# --- back to source ----------------------------------------------------------------------------------


class SeedFetchRequested(Event):
    """A job for the seed-fetchers: fetch this blob from the origin (the only way back to source)."""

    name = "seed.fetch.requested"
    subject_base = subjects.SEED_FETCH_REQUESTED

    task_id: TaskId
    url: str = Field(description="The origin URL of the blob.")
    digest: Sha256Digest | None = None
    content_length: NonNegative | None = None
    piece_size: int | None = Field(None, gt=0)
    authorization: str | None = Field(
        None, description="The client's Authorization header, for registries that need it."
    )
    requested_by: PeerId
    attempt: NonNegative = Field(0, description="Raised by the scheduler to request a task again.")
    pieces: list[NonNegative] | None = Field(
        None,
        max_length=1024,
        description=(
            "On demand: fetch only these pieces, and those SeedPriority adds while the job lives "
            "(a lazy reader's ranges). None: the whole blob."
        ),
    )

    def msg_id(self) -> str:
        # The same task and attempt from many peers at once is one job (JetStream de-duplication).
        return f"seed.fetch:{self.task_id}:{self.attempt}"


class SeedFetchCompleted(Event):
    """A seed-fetcher finished a job, successfully or not."""

    name = "seed.fetch.completed"
    subject_base = subjects.SEED_FETCH_COMPLETED

    task_id: TaskId
    seed_id: PeerId
    attempt: NonNegative = 0
    ok: bool
    content_length: NonNegative | None = None
    piece_count: NonNegative | None = None
    error: str | None = Field(None, max_length=2000)

    def subject(self) -> str:
        return subjects.for_id(self.subject_base, self.task_id)

    def msg_id(self) -> str:
        return f"seed.fetch.completed:{self.task_id}:{self.attempt}:{self.seed_id}"


class SeedPriority(Event):
    """Pieces of a task that peers are waiting for and nobody holds yet: the seed fetches them next.

    Sent on core NATS (not stored): it only reorders a fetch in flight, and a lost one costs time, not
    correctness.
    """

    name = "seed.priority"
    subject_base = subjects.SEED_PRIORITY

    task_id: TaskId
    pieces: list[NonNegative] = Field(max_length=1024)
    whole: bool = Field(False, description="A peer wants the whole blob: an on-demand job fetches every piece.")

    def subject(self) -> str:
        return subjects.for_id(self.subject_base, self.task_id)

    def msg_id(self) -> str:
        return f"seed.priority:{self.task_id}:{','.join(map(str, self.pieces[:8]))}"


# --- download assignment (request/reply) ------------------------------------------------------------


class AssignmentRequest(Event):
    """A peer asks the scheduler which parents to fetch a task's pieces from."""

    name = "assignment.request"
    subject_base = subjects.ASSIGNMENT_REQUEST

    task_id: TaskId
    peer_id: PeerId
    url: str
    digest: Sha256Digest | None = None
    content_length: NonNegative | None = Field(None, description="When the requester knows it (manifest).")
    pieces_wanted: list[NonNegative] | None = Field(None, description="None: every piece the peer lacks.")
    authorization: str | None = None
    piece_size: int | None = Field(
        None,
        description="The piece size the requester proposes if the task is not registered yet (a range reader "
        "asks for small pieces); a registered task keeps its own. A multiple of 65536, 65536 to 15 MiB.",
    )

    @field_validator("piece_size")
    @classmethod
    def _valid_piece_size(cls, value: int | None) -> int | None:
        if value is not None:
            try:
                check_piece_size(value)
            except InvalidRequest as exc:
                raise ValueError(exc.message) from exc
        return value

    def msg_id(self) -> str:
        return f"assignment.request:{self.task_id}:{self.peer_id}"


class ParentCandidate(BaseModel):
    """One parent for one piece, with the evaluator's score (higher is better)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    peer_id: PeerId
    upload_url: str
    score: float
    is_seed: bool = False


class PieceAssignment(BaseModel):
    """Where to get one piece: parents ranked best first."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    piece_number: NonNegative
    range_start: NonNegative
    range_length: NonNegative
    digest: PieceDigest
    parents: list[ParentCandidate]


class TaskStatus(enum.Enum):
    """How far the scheduler's view of a task is."""

    UNKNOWN = "unknown"  # Nobody has any piece; a seed fetch has been requested.
    SEEDING = "seeding"  # Some pieces are announced, more are coming from the seed.
    AVAILABLE = "available"  # Every piece is held by at least one peer.
    FAILED = "failed"  # The seed could not fetch it.


class AssignmentReply(Event):
    """The scheduler's answer: task layout and, per piece, ranked parents."""

    name = "assignment.reply"
    subject_base = subjects.ASSIGNMENT_REQUEST

    task_id: TaskId
    status: TaskStatus
    content_length: NonNegative | None = None
    piece_size: int | None = Field(None, gt=0)
    piece_count: NonNegative | None = None
    pieces: list[PieceAssignment] = Field(default_factory=list)
    seed_requested: bool = False
    retry_after_ms: NonNegative = Field(0, description="Ask again after this long for pieces still missing.")
    error: str | None = None

    def msg_id(self) -> str:
        return f"assignment.reply:{self.task_id}"


# --- preheat: image resolution (request/reply) ------------------------------------------------------


class ImageResolveRequest(Event):
    """The scheduler asks a seed-fetcher what an image is made of (only seeds talk to origins)."""

    name = "image.resolve.request"
    subject_base = subjects.IMAGE_RESOLVE_REQUEST

    image: str = Field(min_length=1, max_length=512, description="HOST[:PORT]/REPO[:TAG|@DIGEST]")
    platform: str | None = Field(
        None, max_length=64, description="os/arch[/variant]; None: every platform of an index."
    )
    authorization: str | None = None
    job_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")

    def msg_id(self) -> str:
        return f"image.resolve:{self.job_id}"


class ResolvedBlob(BaseModel):
    """One blob of a resolved image: a layer or a config, where the origin serves it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    digest: Sha256Digest
    size: NonNegative
    media_type: str
    url: str


class ImageResolveReply(Event):
    """What an image is made of: its manifests and every blob they name, deduplicated."""

    name = "image.resolve.reply"
    subject_base = subjects.IMAGE_RESOLVE_REQUEST

    image: str
    manifests: list[Sha256Digest] = Field(description="Image manifests resolved (one per platform).")
    platforms: list[str]
    blobs: list[ResolvedBlob]

    def msg_id(self) -> str:
        return f"image.resolve.reply:{self.image}"


EVENT_TYPES: tuple[type[Event], ...] = (
    PeerRegistered,
    PeerHeartbeat,
    PeerLeft,
    TaskRegistered,
    PieceAnnounced,
    PieceFailed,
    SeedFetchRequested,
    SeedFetchCompleted,
    SeedPriority,
    AssignmentRequest,
    AssignmentReply,
    ImageResolveRequest,
    ImageResolveReply,
)

#: Sent over core NATS only (requests, replies, hints): never stored, always carry their header, and a
#: request and its reply share one subject, so they are not found by subject.
CORE_NATS_TYPES: tuple[type[Event], ...] = (
    AssignmentRequest,
    AssignmentReply,
    SeedPriority,
    ImageResolveRequest,
    ImageResolveReply,
)

_BY_TAG: dict[str, type[Event]] = {event_type.schema_tag(): event_type for event_type in EVENT_TYPES}
_BY_SUBJECT_BASE: dict[str, type[Event]] = {
    event_type.subject_base: event_type for event_type in EVENT_TYPES if event_type not in CORE_NATS_TYPES
}


def event_type_for(tag: str | None, subject: str) -> type[Event]:
    """The model for a message: by its ``Damselfly-Event`` header, else by its subject."""
    if tag is not None:
        try:
            return _BY_TAG[tag]
        except KeyError:
            raise MalformedMessage(f"unknown event type {tag!r} on {subject}", subject=subject) from None
    for base, event_type in _BY_SUBJECT_BASE.items():
        if subject == base or subject.startswith(base + "."):
            return event_type
    raise MalformedMessage(f"no event type is published on {subject}", subject=subject)


def is_task_id(value: str) -> bool:
    """Whether ``value`` is a well-formed task id."""
    return bool(_TASK_ID_RE.match(value))
