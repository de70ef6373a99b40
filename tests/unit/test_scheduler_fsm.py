"""The scheduler's task and piece state machines, every transition including the illegal ones."""

from __future__ import annotations

import itertools

import pytest

from services.piece_scheduler.task_map import (
    PIECE_FSM,
    TASK_FSM,
    PieceEvent,
    PieceState,
    TaskEvent,
    TaskState,
)
from shared.errors import InvalidStateTransition

# Written out again on purpose: a change to the table must be a change to this test too.
TASK_LEGAL = {
    (TaskState.PENDING, TaskEvent.SEED_REQUESTED): TaskState.SEEDING,
    (TaskState.PENDING, TaskEvent.PIECES_COMPLETE): TaskState.AVAILABLE,
    (TaskState.SEEDING, TaskEvent.SEED_SUCCEEDED): TaskState.AVAILABLE,
    (TaskState.SEEDING, TaskEvent.SEED_FAILED): TaskState.FAILED,
    (TaskState.AVAILABLE, TaskEvent.SEED_REQUESTED): TaskState.SEEDING,
    (TaskState.AVAILABLE, TaskEvent.PIECES_INCOMPLETE): TaskState.PENDING,
    (TaskState.FAILED, TaskEvent.SEED_REQUESTED): TaskState.SEEDING,
    (TaskState.FAILED, TaskEvent.PIECES_COMPLETE): TaskState.AVAILABLE,
}

PIECE_LEGAL = {
    (PieceState.MISSING, PieceEvent.ANNOUNCED): PieceState.HELD,
    (PieceState.HELD, PieceEvent.ANNOUNCED): PieceState.HELD,
    (PieceState.HELD, PieceEvent.LAST_HOLDER_GONE): PieceState.LOST,
    (PieceState.LOST, PieceEvent.ANNOUNCED): PieceState.HELD,
}


@pytest.mark.parametrize(("state", "event"), list(itertools.product(TaskState, TaskEvent)))
def test_every_task_state_event_pair(state: TaskState, event: TaskEvent) -> None:
    if (state, event) in TASK_LEGAL:
        assert TASK_FSM.allows(state, event)
        assert TASK_FSM.next_state(state, event) is TASK_LEGAL[(state, event)]
    else:
        assert not TASK_FSM.allows(state, event)
        with pytest.raises(InvalidStateTransition) as caught:
            TASK_FSM.next_state(state, event)
        assert caught.value.state == state.value and caught.value.event == event.value
        assert caught.value.details["machine"] == "task"


@pytest.mark.parametrize(("state", "event"), list(itertools.product(PieceState, PieceEvent)))
def test_every_piece_state_event_pair(state: PieceState, event: PieceEvent) -> None:
    if (state, event) in PIECE_LEGAL:
        assert PIECE_FSM.next_state(state, event) is PIECE_LEGAL[(state, event)]
    else:
        with pytest.raises(InvalidStateTransition) as caught:
            PIECE_FSM.next_state(state, event)
        assert caught.value.state == state.value and caught.value.event == event.value
        assert caught.value.details["machine"] == "piece"


def test_tables_are_exactly_the_documented_ones() -> None:
    assert TASK_FSM.transitions == TASK_LEGAL
    assert PIECE_FSM.transitions == PIECE_LEGAL


def test_a_task_never_has_two_seed_fetches_in_flight() -> None:
    # SEEDING is "one fetch in flight": nothing but that fetch's completion may leave it.
    leaving = {event for (state, event) in TASK_LEGAL if state is TaskState.SEEDING}
    assert leaving == {TaskEvent.SEED_SUCCEEDED, TaskEvent.SEED_FAILED}
    assert not TASK_FSM.allows(TaskState.SEEDING, TaskEvent.SEED_REQUESTED)


def test_every_state_is_reachable_from_pending() -> None:
    reached = {TaskState.PENDING}
    frontier = [TaskState.PENDING]
    while frontier:
        state = frontier.pop()
        for (source, _event), target in TASK_LEGAL.items():
            if source is state and target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached == set(TaskState)
