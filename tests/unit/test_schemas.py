"""Event schemas: round trips, strictness, subjects, de-duplication ids, and the checked-in JSON Schemas."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import subjects
from shared.errors import MalformedMessage
from shared.schemas import (
    EVENT_TYPES,
    AssignmentReply,
    AssignmentRequest,
    Event,
    ImageResolveReply,
    ImageResolveRequest,
    ParentCandidate,
    PeerHeartbeat,
    PeerInfo,
    PeerLeft,
    PeerRegistered,
    PieceAnnounced,
    PieceAssignment,
    PieceFailed,
    PieceFailureReason,
    ResolvedBlob,
    SeedFetchCompleted,
    SeedFetchRequested,
    SeedPriority,
    TaskRegistered,
    TaskStatus,
    event_type_for,
)
from shared.schemas.events import CORE_NATS_TYPES
from shared.schemas.export import CHECKED_IN_DIR, export_schemas, stale_schemas

TASK = "ab" * 32
DIGEST = "sha256:" + "cd" * 32
PEER = PeerInfo(peer_id="peer-0", node_name="n0", ip="127.0.0.1", upload_url="http://127.0.0.1:40901")

SAMPLES: list[Event] = [
    PeerRegistered(peer=PEER),
    PeerHeartbeat(peer_id="peer-0", sequence=7, upload_slots_in_use=2, tasks_held=3),
    PeerLeft(peer_id="peer-0"),
    TaskRegistered(
        task_id=TASK,
        url="http://o/v2/x/blobs/" + DIGEST,
        digest=DIGEST,
        content_length=10,
        piece_size=4,
        piece_count=3,
        registered_by="peer-0",
    ),
    PieceAnnounced(task_id=TASK, piece_number=2, range_start=8, range_length=2, digest=DIGEST, holder="peer-0"),
    PieceFailed(
        task_id=TASK,
        piece_number=1,
        parent_id="peer-1",
        reporter_id="peer-0",
        reason=PieceFailureReason.DIGEST_MISMATCH,
    ),
    SeedFetchRequested(task_id=TASK, url="http://o/v2/x/blobs/" + DIGEST, requested_by="peer-0"),
    SeedFetchCompleted(task_id=TASK, seed_id="seed-0", ok=True, content_length=10, piece_count=3),
    SeedPriority(task_id=TASK, pieces=[7, 2]),
    AssignmentRequest(task_id=TASK, peer_id="peer-0", url="http://o/v2/x/blobs/" + DIGEST),
    ImageResolveRequest(image="127.0.0.1:5000/team/app:v1", platform="linux/amd64", job_id="job-1"),
    ImageResolveReply(
        image="127.0.0.1:5000/team/app:v1",
        manifests=[DIGEST],
        platforms=["linux/amd64"],
        blobs=[ResolvedBlob(digest=DIGEST, size=10, media_type="application/x", url="http://o/v2/a/blobs/x")],
    ),
    AssignmentReply(
        task_id=TASK,
        status=TaskStatus.SEEDING,
        pieces=[
            PieceAssignment(
                piece_number=0,
                range_start=0,
                range_length=4,
                digest=DIGEST,
                parents=[ParentCandidate(peer_id="seed-0", upload_url="http://s", score=1.0)],
            )
        ],
    ),
]


def test_there_is_a_sample_of_every_event_type() -> None:
    assert {type(sample) for sample in SAMPLES} == set(EVENT_TYPES)


@pytest.mark.parametrize("event", SAMPLES, ids=lambda event: event.name)
def test_round_trip_through_the_wire_form(event: Event) -> None:
    assert type(event).from_bytes(event.to_bytes()) == event


@pytest.mark.parametrize("event", SAMPLES, ids=lambda event: event.name)
def test_subjects_are_versioned_and_found_again(event: Event) -> None:
    assert event.subject().startswith("damselfly.v1.")
    if type(event) not in CORE_NATS_TYPES:
        assert event_type_for(None, event.subject()) is type(event)
    assert event_type_for(event.schema_tag(), event.subject()) is type(event)


@pytest.mark.parametrize("event", SAMPLES, ids=lambda event: event.name)
def test_unknown_fields_are_rejected(event: Event) -> None:
    data = orjson.loads(event.to_bytes())
    data["from_the_future"] = 1
    with pytest.raises(MalformedMessage, match="from_the_future"):
        type(event).from_bytes(orjson.dumps(data))


@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b"[]", b'{"task_id": "nothex"}', b'{"peer_id": "peer 0", "sequence": 1}'],
)
def test_malformed_payloads_raise_malformed_message(payload: bytes) -> None:
    with pytest.raises(MalformedMessage):
        PieceAnnounced.from_bytes(payload)
    with pytest.raises(MalformedMessage):
        PeerHeartbeat.from_bytes(payload)


def test_unknown_event_tag_and_subject_are_malformed() -> None:
    with pytest.raises(MalformedMessage, match="unknown event type"):
        event_type_for("piece.exploded/9", "damselfly.v1.piece.exploded")
    with pytest.raises(MalformedMessage, match="no event type"):
        event_type_for(None, "damselfly.v1.nothing")


def test_same_fact_has_the_same_msg_id_and_different_facts_differ() -> None:
    first = PieceAnnounced(task_id=TASK, piece_number=1, range_start=0, range_length=1, digest=DIGEST, holder="p")
    again = PieceAnnounced(
        task_id=TASK, piece_number=1, range_start=0, range_length=1, digest=DIGEST, holder="p", cost_ms=12.0
    )
    other = PieceAnnounced(task_id=TASK, piece_number=2, range_start=1, range_length=1, digest=DIGEST, holder="p")
    assert first.msg_id() == again.msg_id() != other.msg_id()
    job = SeedFetchRequested(task_id=TASK, url="u", requested_by="a")
    same_job_other_peer = SeedFetchRequested(task_id=TASK, url="u", requested_by="b")
    assert job.msg_id() == same_job_other_peer.msg_id()  # Many peers asking at once make one job.
    assert job.msg_id() != SeedFetchRequested(task_id=TASK, url="u", requested_by="a", attempt=1).msg_id()


@given(st.text(min_size=1, max_size=20))
def test_subject_tokens_never_contain_wildcards_or_dots(ident: str) -> None:
    bad = any(ch in ident for ch in " .*>\t\r\n")
    if bad:
        with pytest.raises(ValueError):
            subjects.for_id("damselfly.v1.x", ident)
    else:
        assert subjects.for_id("damselfly.v1.x", ident).count(".") == 3


def test_checked_in_json_schemas_match_the_models() -> None:
    stale = stale_schemas(CHECKED_IN_DIR)
    assert stale == [], f"run `damselfly schemas export {CHECKED_IN_DIR}`: stale {stale}"


def test_a_changed_model_is_detected_as_stale(tmp_path: Path) -> None:
    export_schemas(tmp_path)
    assert stale_schemas(tmp_path) == []
    victim = tmp_path / "piece.announced.v1.json"
    schema = orjson.loads(victim.read_bytes())
    schema["properties"].pop("digest")
    victim.write_bytes(orjson.dumps(schema))
    (tmp_path / "peer.left.v1.json").unlink()
    assert sorted(stale_schemas(tmp_path)) == ["peer.left.v1.json", "piece.announced.v1.json"]


def test_an_assignment_request_with_a_bad_piece_size_is_malformed() -> None:
    from shared.schemas import AssignmentRequest

    good = AssignmentRequest(task_id="ab" * 32, peer_id="p", url="u", piece_size=256 * 1024)
    assert AssignmentRequest.from_bytes(good.to_bytes()) == good
    bad = good.to_bytes().replace(b'"piece_size":262144', b'"piece_size":1000')
    with pytest.raises(MalformedMessage, match="multiple of 65536"):
        AssignmentRequest.from_bytes(bad)
