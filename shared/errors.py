"""The closed set of failures Damselfly knows, mapped once to HTTP and once to the bus.

Every error a service raises on purpose is a subclass of :class:`DamselflyError`. Each class carries
the HTTP status it becomes at an API edge and the :class:`BusDisposition` it becomes when it escapes a
message handler, so no route or consumer decides that on its own.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar


class BusDisposition(enum.Enum):
    """What a consumer does with a message whose handler raised."""

    ACK = "ack"  # The message is done with (e.g. a duplicate): acknowledge it.
    NAK = "nak"  # A transient failure: redeliver after a delay.
    TERM = "term"  # The message can never succeed (malformed, illegal): stop redelivering it.


class DamselflyError(Exception):
    """Base class of every failure the system knows."""

    http_status: ClassVar[int] = 500
    bus_disposition: ClassVar[BusDisposition] = BusDisposition.NAK
    code: ClassVar[str] = "internal"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def http_headers(self) -> dict[str, str]:
        """Headers an HTTP response for this error carries (none, for most errors)."""
        return {}

    def to_json(self) -> dict[str, Any]:
        """The JSON body an HTTP client receives for this error."""
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class ConfigError(DamselflyError):
    """The configuration is invalid: unknown key, wrong type or bad value."""

    code = "config_invalid"
    bus_disposition = BusDisposition.TERM


class DependencyUnavailable(DamselflyError):
    """A dependency (NATS, database, origin, peer) cannot be reached right now."""

    http_status = 503
    code = "dependency_unavailable"
    bus_disposition = BusDisposition.NAK


class MalformedMessage(DamselflyError):
    """A bus message or request body does not match its schema."""

    http_status = 400
    code = "malformed"
    bus_disposition = BusDisposition.TERM


class InvalidRequest(DamselflyError):
    """A request is well formed but its values are not acceptable."""

    http_status = 400
    code = "invalid_request"
    bus_disposition = BusDisposition.TERM


class NotFound(DamselflyError):
    """The named resource (peer, task, piece, blob, mount) does not exist."""

    http_status = 404
    code = "not_found"
    bus_disposition = BusDisposition.TERM


class PeerNotFound(NotFound):
    """No peer with this id is known to the scheduler."""

    code = "peer_not_found"


class TaskNotFound(NotFound):
    """No task with this id is known."""

    code = "task_not_found"


class PieceNotFound(NotFound):
    """The piece is not held here."""

    code = "piece_not_found"


class Forbidden(DamselflyError):
    """The request is understood but not allowed (e.g. an origin off the allow-list)."""

    http_status = 403
    code = "forbidden"
    bus_disposition = BusDisposition.TERM


class Unauthorized(DamselflyError):
    """The request lacks valid credentials."""

    http_status = 401
    code = "unauthorized"
    bus_disposition = BusDisposition.TERM

    def http_headers(self) -> dict[str, str]:
        # RFC 9110: a 401 names the scheme the client should use.
        return {"WWW-Authenticate": 'Bearer realm="damselfly"'}


class RangeNotSatisfiable(DamselflyError):
    """A byte range lies outside the resource."""

    http_status = 416
    code = "range_not_satisfiable"
    bus_disposition = BusDisposition.TERM


class DigestMismatch(DamselflyError):
    """Bytes do not match the digest they were announced with."""

    http_status = 502
    code = "digest_mismatch"
    bus_disposition = BusDisposition.NAK

    def __init__(self, expected: str, actual: str, what: str = "data") -> None:
        super().__init__(f"{what}: expected digest {expected}, got {actual}", expected=expected, actual=actual)
        self.expected = expected
        self.actual = actual


class BlobDigestMismatch(DigestMismatch):
    """A whole blob from the origin does not match its digest: fetching it again will not help."""

    code = "blob_digest_mismatch"
    bus_disposition = BusDisposition.TERM


class InvalidStateTransition(DamselflyError):
    """An event is not allowed in the current state of a state machine."""

    http_status = 409
    code = "invalid_state_transition"
    bus_disposition = BusDisposition.TERM

    def __init__(self, machine: str, state: str, event: str) -> None:
        super().__init__(
            f"{machine}: event {event!r} is not allowed in state {state!r}",
            machine=machine,
            state=state,
            event=event,
        )
        self.state = state
        self.event = event


class DuplicateEvent(DamselflyError):
    """The event was already applied; applying it again would change nothing."""

    http_status = 200
    code = "duplicate"
    bus_disposition = BusDisposition.ACK


class NoSpace(DamselflyError):
    """The store is full even after garbage collection."""

    http_status = 507
    code = "no_space"
    bus_disposition = BusDisposition.NAK


class UpstreamError(DamselflyError):
    """The origin registry or a parent peer answered with an error."""

    http_status = 502
    code = "upstream_error"
    bus_disposition = BusDisposition.NAK


def http_status_of(exc: BaseException) -> int:
    """The HTTP status an exception becomes at an API edge (500 for anything unknown)."""
    return exc.http_status if isinstance(exc, DamselflyError) else 500


def bus_disposition_of(exc: BaseException) -> BusDisposition:
    """What a consumer does with a message whose handler raised ``exc``.

    Unknown exceptions are treated as transient: the message is redelivered (up to the consumer's
    ``max_deliver``) rather than silently lost.
    """
    return exc.bus_disposition if isinstance(exc, DamselflyError) else BusDisposition.NAK
