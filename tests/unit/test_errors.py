"""The closed error set: one HTTP status and one bus disposition per class."""

from __future__ import annotations

import pytest

from shared import errors
from shared.errors import BusDisposition, DamselflyError, bus_disposition_of, http_status_of

ALL_ERRORS = [value for value in vars(errors).values() if isinstance(value, type) and issubclass(value, DamselflyError)]


def test_codes_are_unique() -> None:
    codes = [error.code for error in ALL_ERRORS]
    assert len(codes) == len(set(codes)), codes


@pytest.mark.parametrize(
    ("error", "status", "disposition"),
    [
        (errors.MalformedMessage("x"), 400, BusDisposition.TERM),
        (errors.Forbidden("x"), 403, BusDisposition.TERM),
        (errors.Unauthorized("x"), 401, BusDisposition.TERM),
        (errors.PieceNotFound("x"), 404, BusDisposition.TERM),
        (errors.RangeNotSatisfiable("x"), 416, BusDisposition.TERM),
        (errors.DependencyUnavailable("x"), 503, BusDisposition.NAK),
        (errors.UpstreamError("x"), 502, BusDisposition.NAK),
        (errors.DigestMismatch("sha256:a", "sha256:b"), 502, BusDisposition.NAK),
        (errors.BlobDigestMismatch("sha256:a", "sha256:b"), 502, BusDisposition.TERM),
        (errors.InvalidStateTransition("peer", "left", "heartbeat"), 409, BusDisposition.TERM),
        (errors.DuplicateEvent("x"), 200, BusDisposition.ACK),
        (errors.NoSpace("x"), 507, BusDisposition.NAK),
    ],
)
def test_each_error_maps_once_to_http_and_bus(error: DamselflyError, status: int, disposition: BusDisposition) -> None:
    assert http_status_of(error) == status
    assert bus_disposition_of(error) is disposition
    body = error.to_json()
    assert body["error"] == error.code and body["message"] == error.message


def test_unknown_exceptions_are_500_and_redelivered() -> None:
    assert http_status_of(RuntimeError("boom")) == 500
    assert bus_disposition_of(RuntimeError("boom")) is BusDisposition.NAK


def test_digest_mismatch_carries_both_digests() -> None:
    error = errors.DigestMismatch("sha256:" + "a" * 64, "sha256:" + "b" * 64, what="piece 3")
    assert error.details == {"expected": "sha256:" + "a" * 64, "actual": "sha256:" + "b" * 64}
    assert error.message.startswith("piece 3: expected digest")
