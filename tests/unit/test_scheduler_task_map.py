"""The piece map as a fold over TASKS events: duplicates, out-of-order delivery, bad parents, seeds."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.piece_scheduler.task_map import PieceState, TaskMap, TaskState
from shared.errors import TaskNotFound
from shared.schemas import (
    Event,
    PieceAnnounced,
    PieceFailed,
    PieceFailureReason,
    PieceSource,
    SeedFetchCompleted,
    TaskRegistered,
)

TASK = "ab" * 32
OTHER_TASK = "cd" * 32
PIECE_SIZE = 4
CONTENT_LENGTH = 10  # Three pieces: 4 + 4 + 2 bytes.


def digest(n: int, variant: str = "0") -> str:
    return "sha256:" + (variant + format(n, "x")).rjust(64, "0")


def registered(task: str = TASK) -> TaskRegistered:
    return TaskRegistered(
        task_id=task,
        url="http://origin/v2/lib/blobs/x",
        content_length=CONTENT_LENGTH,
        piece_size=PIECE_SIZE,
        piece_count=3,
        registered_by="seed-0",
    )


def announced(
    number: int,
    holder: str,
    *,
    task: str = TASK,
    parent: str | None = None,
    cost: float = 0.0,
    source: PieceSource = PieceSource.PEER,
    variant: str = "0",
) -> PieceAnnounced:
    start = number * PIECE_SIZE
    return PieceAnnounced(
        task_id=task,
        piece_number=number,
        range_start=start,
        range_length=min(PIECE_SIZE, CONTENT_LENGTH - start),
        digest=digest(number, variant),
        holder=holder,
        source=source,
        parent_id=parent,
        cost_ms=cost,
    )


def failed(parent: str, reason: PieceFailureReason, number: int = 0, at: datetime | None = None) -> PieceFailed:
    return PieceFailed(
        task_id=TASK,
        piece_number=number,
        parent_id=parent,
        reporter_id="reporter",
        reason=reason,
        reported_at=at or datetime(2030, 1, 1, tzinfo=UTC),
    )


def completed(attempt: int, ok: bool, seed: str = "seed-0") -> SeedFetchCompleted:
    return SeedFetchCompleted(task_id=TASK, seed_id=seed, attempt=attempt, ok=ok, error=None if ok else "origin 500")


def seeded_by_origin(holder: str = "seed-0") -> list[Event]:
    return [announced(n, holder, source=PieceSource.ORIGIN) for n in range(3)]


def snapshot(tasks: TaskMap) -> dict[str, Any]:
    """Everything observable about the map, for comparing two folds."""
    result: dict[str, Any] = {"back_to_source": tasks.back_to_source_total}
    for task in tasks.all():
        result[task.task_id] = {
            "state": task.state,
            "layout": (task.content_length, task.piece_size, task.piece_count),
            "pieces": {
                number: (piece.state, piece.digest, piece.range_start, {h: sorted(d) for h, d in piece.holders.items()})
                for number, piece in sorted(task.pieces.items())
            },
            "blocked": sorted(task.blocked_parents),
            "failures": dict(task.failures),
            "attempts": sorted(task.attempts_seen),
            "completed": dict(task.completed_attempts),
        }
    for peer in ("a", "b", "c", "seed-0"):
        stats = tasks.parent(peer)
        result[f"parent:{peer}"] = (list(stats.costs), dict(stats.failures), stats.last_failure_at)
    return result


def fold(events: list[Event]) -> TaskMap:
    tasks = TaskMap()
    for event in events:
        tasks.apply(event, now=1000.0)
    return tasks


def test_registration_then_announcements_make_the_task_available() -> None:
    tasks = fold([registered(), *seeded_by_origin()])
    task = tasks.get(TASK)
    assert task.state is TaskState.AVAILABLE and task.is_complete
    assert task.pieces_by_holder() == {"seed-0": [0, 1, 2]}
    assert task.pieces[2].range_length == 2
    assert task.back_to_source_count == 3 and tasks.back_to_source_total == 3


def test_announcements_before_registration_are_kept_and_complete_the_task_later() -> None:
    tasks = fold(seeded_by_origin())
    task = tasks.get(TASK)
    assert not task.layout_known and task.state is TaskState.PENDING and not task.is_complete
    assert task.held_numbers() == {0, 1, 2}
    tasks.apply(registered())
    assert task.layout_known and task.state is TaskState.AVAILABLE


def test_unknown_task_is_not_found() -> None:
    tasks = fold([registered()])
    assert tasks.find(OTHER_TASK) is None
    with pytest.raises(TaskNotFound):
        tasks.get(OTHER_TASK)


def test_empty_blob_is_available_on_registration() -> None:
    tasks = TaskMap()
    tasks.apply(TaskRegistered(task_id=TASK, url="u", content_length=0, piece_size=4, piece_count=0, registered_by="a"))
    assert tasks.get(TASK).state is TaskState.AVAILABLE


def test_the_first_registration_wins() -> None:
    tasks = fold([registered()])
    tasks.apply(
        TaskRegistered(task_id=TASK, url="v", content_length=99, piece_size=8, piece_count=13, registered_by="b")
    )
    assert tasks.get(TASK).piece_count == 3 and tasks.get(TASK).url == "http://origin/v2/lib/blobs/x"


def test_a_piece_outside_the_registered_layout_is_ignored() -> None:
    tasks = fold([registered()])
    tasks.apply(
        PieceAnnounced(task_id=TASK, piece_number=7, range_start=28, range_length=4, digest=digest(7), holder="a")
    )
    assert 7 not in tasks.get(TASK).pieces


def test_costs_are_recorded_once_per_download_and_unmeasured_ones_are_skipped() -> None:
    tasks = fold([registered(), announced(0, "a", parent="b", cost=12.0)])
    tasks.apply(announced(0, "a", parent="b", cost=12.0), now=2000.0)  # Redelivered.
    tasks.apply(announced(1, "a", parent="b", cost=0.0), now=2000.0)  # Not measured.
    tasks.apply(announced(2, "c", parent="b", cost=30.0), now=1000.0)
    assert list(tasks.parent("b").costs) == [12.0, 30.0]
    assert tasks.parent("b").last_cost_at == 1000.0
    assert list(tasks.parent("a").costs) == []


def test_the_origin_digest_wins_over_an_earlier_peer_announcement() -> None:
    tasks = fold([registered(), announced(0, "a", variant="f")])
    piece = tasks.get(TASK).pieces[0]
    assert piece.digest == digest(0, "f") and tasks.get(TASK).good_holders(piece) == ["a"]
    tasks.apply(announced(0, "seed-0", source=PieceSource.ORIGIN))
    assert piece.digest == digest(0) and tasks.get(TASK).good_holders(piece) == ["seed-0"]
    # A later peer announcement does not displace the origin's digest.
    tasks.apply(announced(0, "b", variant="e"))
    assert piece.digest == digest(0) and tasks.get(TASK).good_holders(piece) == ["seed-0"]


def test_digest_mismatch_blocks_the_parent_for_that_task_only() -> None:
    tasks = fold(
        [
            registered(),
            registered(OTHER_TASK),
            *seeded_by_origin("a"),
            announced(0, "a", task=OTHER_TASK),
            announced(0, "b", parent="a", cost=5.0),
        ]
    )
    task = tasks.get(TASK)
    assert task.state is TaskState.AVAILABLE
    tasks.apply(failed("a", PieceFailureReason.DIGEST_MISMATCH, number=1))
    assert task.blocked_parents == {"a"}
    assert task.pieces_by_holder() == {"b": [0]}
    assert task.pieces[0].state is PieceState.HELD
    assert task.pieces[1].state is PieceState.LOST and task.pieces[2].state is PieceState.LOST
    assert task.state is TaskState.PENDING
    # The other task still trusts it.
    assert tasks.get(OTHER_TASK).pieces_by_holder() == {"a": [0]}
    # A blocked parent announcing again is still not a good holder.
    tasks.apply(announced(1, "a", source=PieceSource.ORIGIN))
    assert task.pieces[1].state is PieceState.LOST


def test_connection_failures_record_the_report_time_once() -> None:
    at = datetime(2030, 1, 1, tzinfo=UTC)
    tasks = fold([registered(), announced(0, "a")])
    report = failed("a", PieceFailureReason.CONNECTION, at=at)
    tasks.apply(report)
    tasks.apply(report)  # Redelivered.
    tasks.apply(failed("a", PieceFailureReason.TIMEOUT, at=datetime(2029, 1, 1, tzinfo=UTC)))  # Older.
    stats = tasks.parent("a")
    assert stats.last_failure_at == at.timestamp()
    assert dict(stats.failures) == {"connection": 1, "timeout": 1}
    assert tasks.get(TASK).blocked_parents == set()


def test_not_held_forgets_the_holder_until_it_announces_again() -> None:
    tasks = fold([registered(), announced(0, "a")])
    piece = tasks.get(TASK).pieces[0]
    tasks.apply(failed("a", PieceFailureReason.NOT_HELD))
    assert piece.holders == {} and piece.state is PieceState.LOST
    tasks.apply(announced(0, "a"))
    assert piece.state is PieceState.HELD


def test_a_seed_attempt_fails_then_a_new_attempt_succeeds() -> None:
    tasks = fold([registered()])
    task = tasks.begin_seed(TASK, 0, url="http://origin/x", now=1.0)
    assert task.state is TaskState.SEEDING and task.seed_in_flight and task.next_attempt == 1
    tasks.apply(completed(0, ok=False), now=2.0)
    assert task.state is TaskState.FAILED and task.consecutive_seed_failures == 1
    assert task.last_seed_failure_at == 2.0 and task.last_seed_error == "origin 500"
    tasks.begin_seed(TASK, task.next_attempt, now=3.0)
    assert task.state is TaskState.SEEDING and task.current_attempt == 1
    for event in [*seeded_by_origin(), completed(1, ok=True)]:
        tasks.apply(event)
    assert task.state is TaskState.AVAILABLE and task.consecutive_seed_failures == 0
    assert task.seed_attempts == 2 and task.next_attempt == 2


def test_a_successful_seed_that_left_gaps_leaves_the_task_pending() -> None:
    tasks = fold([registered()])
    tasks.begin_seed(TASK, 0)
    tasks.apply(announced(0, "seed-0", source=PieceSource.ORIGIN))
    tasks.apply(completed(0, ok=True))
    assert tasks.get(TASK).state is TaskState.PENDING


def test_a_replayed_completion_proves_a_request_this_replica_never_saw() -> None:
    tasks = fold([registered(), completed(0, ok=False)])
    task = tasks.get(TASK)
    assert task.state is TaskState.FAILED and task.next_attempt == 1
    tasks.apply(completed(1, ok=False))
    assert task.state is TaskState.FAILED and task.consecutive_seed_failures == 2 and task.next_attempt == 2


def test_stale_and_second_completions_do_not_change_the_outcome() -> None:
    tasks = fold([registered()])
    tasks.begin_seed(TASK, 0)
    tasks.apply(completed(0, ok=False))
    tasks.begin_seed(TASK, 1)
    tasks.apply(completed(0, ok=True, seed="seed-1"))  # A straggler of attempt 0.
    task = tasks.get(TASK)
    assert task.state is TaskState.SEEDING and task.current_attempt == 1
    tasks.apply(completed(1, ok=False))
    tasks.apply(completed(1, ok=True, seed="seed-1"))  # A second seed on the same attempt.
    assert task.state is TaskState.FAILED and task.completed_attempts == {0: False, 1: False}


def test_peers_completing_a_failed_task_make_it_available() -> None:
    tasks = fold([registered()])
    tasks.begin_seed(TASK, 0)
    tasks.apply(completed(0, ok=False))
    for number in range(3):
        tasks.apply(announced(number, "a", parent="b", cost=3.0))
    assert tasks.get(TASK).state is TaskState.AVAILABLE


def test_a_seed_requested_for_an_available_task_whose_holders_left() -> None:
    tasks = fold([registered(), *seeded_by_origin()])
    task = tasks.begin_seed(TASK, 0)
    assert task.state is TaskState.SEEDING
    # Peers completing the map do not end the fetch: only its completion does.
    tasks.apply(announced(0, "a"))
    assert task.state is TaskState.SEEDING
    tasks.apply(completed(0, ok=True))
    assert task.state is TaskState.AVAILABLE


def test_state_counts() -> None:
    tasks = fold([registered(), *seeded_by_origin(), registered(OTHER_TASK)])
    assert tasks.state_counts() == {TaskState.AVAILABLE: 1, TaskState.PENDING: 1}


# --- folding is idempotent and order-insensitive where the stream may reorder ---------------------

HOLDERS = ("a", "b", "c", "seed-0")

piece_events = st.one_of(
    st.builds(
        announced,
        st.integers(0, 2),
        st.sampled_from(HOLDERS),
        parent=st.sampled_from((None, *HOLDERS)),
        cost=st.sampled_from((0.0, 5.0, 50.0)),
        source=st.sampled_from(PieceSource),
        variant=st.sampled_from(("0", "f")),
    ),
    st.just(registered()),
    st.builds(
        failed,
        st.sampled_from(HOLDERS),
        st.sampled_from([PieceFailureReason.DIGEST_MISMATCH, PieceFailureReason.CONNECTION]),
    ),
)


@settings(max_examples=200, deadline=None)
@given(events=st.lists(piece_events, max_size=25), data=st.data())
def test_redelivering_any_events_changes_nothing(events: list[Event], data: st.DataObject) -> None:
    once = fold(events)
    # Each event delivered again at some later point, as after a lost ack.
    redelivered = list(events)
    for event in events:
        at = data.draw(st.integers(redelivered.index(event), len(redelivered)))
        redelivered.insert(at, event)
    twice = fold(redelivered)
    assert snapshot(twice) == snapshot(once)


@settings(max_examples=200, deadline=None)
@given(
    announcements=st.lists(
        st.builds(announced, st.integers(0, 2), st.sampled_from(HOLDERS), source=st.sampled_from(PieceSource)),
        max_size=12,
    ),
    position=st.integers(0, 12),
)
def test_the_registration_may_come_anywhere_among_the_announcements(announcements: list[Event], position: int) -> None:
    first = fold([registered(), *announcements])
    anywhere = fold([*announcements[:position], registered(), *announcements[position:]])
    assert snapshot(anywhere) == snapshot(first)
