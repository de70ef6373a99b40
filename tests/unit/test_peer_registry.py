"""The scheduler's peer state machine, every transition including the illegal ones."""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest

from services.piece_scheduler.peer_registry import PEER_FSM, PeerEvent, PeerRegistry, PeerState
from shared.errors import InvalidStateTransition, PeerNotFound
from shared.schemas import PeerHeartbeat, PeerInfo, PeerLeft, PeerRegistered

LEGAL = {
    (PeerState.PENDING, PeerEvent.REGISTER): PeerState.ACTIVE,
    (PeerState.PENDING, PeerEvent.LEAVE): PeerState.LEFT,
    (PeerState.ACTIVE, PeerEvent.REGISTER): PeerState.ACTIVE,
    (PeerState.ACTIVE, PeerEvent.HEARTBEAT): PeerState.ACTIVE,
    (PeerState.ACTIVE, PeerEvent.TIMEOUT): PeerState.STALE,
    (PeerState.ACTIVE, PeerEvent.LEAVE): PeerState.LEFT,
    (PeerState.STALE, PeerEvent.REGISTER): PeerState.ACTIVE,
    (PeerState.STALE, PeerEvent.HEARTBEAT): PeerState.ACTIVE,
    (PeerState.STALE, PeerEvent.EVICT): PeerState.LEFT,
    (PeerState.STALE, PeerEvent.LEAVE): PeerState.LEFT,
    (PeerState.LEFT, PeerEvent.REGISTER): PeerState.ACTIVE,
}


@pytest.mark.parametrize(("state", "event"), list(itertools.product(PeerState, PeerEvent)))
def test_every_state_event_pair(state: PeerState, event: PeerEvent) -> None:
    if (state, event) in LEGAL:
        assert PEER_FSM.next_state(state, event) is LEGAL[(state, event)]
    else:
        with pytest.raises(InvalidStateTransition) as caught:
            PEER_FSM.next_state(state, event)
        assert caught.value.state == state.value and caught.value.event == event.value


def info(peer_id: str) -> PeerInfo:
    return PeerInfo(peer_id=peer_id, node_name=peer_id, ip="127.0.0.1", upload_url=f"http://{peer_id}")


def test_lifecycle_register_heartbeat_stale_back_and_leave() -> None:
    registry = PeerRegistry(stale_after=10, evict_after=100)
    record = registry.register(PeerRegistered(peer=info("a")))
    assert record.state is PeerState.ACTIVE and registry.active() == [record]
    registry.heartbeat(PeerHeartbeat(peer_id="a", sequence=1, upload_slots_in_use=4, tasks_held=2))
    assert record.upload_slots_in_use == 4 and record.tasks_held == 2
    assert registry.sweep(now=record.last_seen_monotonic + 11) == [record]
    assert record.state is PeerState.STALE and registry.active() == []
    registry.heartbeat(PeerHeartbeat(peer_id="a", sequence=2))
    assert record.state is PeerState.ACTIVE
    registry.leave(PeerLeft(peer_id="a"))
    assert record.state is PeerState.LEFT
    with pytest.raises(InvalidStateTransition):
        registry.heartbeat(PeerHeartbeat(peer_id="a", sequence=3))


def test_stale_peers_are_evicted_after_the_longer_timeout() -> None:
    registry = PeerRegistry(stale_after=10, evict_after=100)
    record = registry.register(PeerRegistered(peer=info("a")))
    start = record.last_seen_monotonic
    registry.sweep(now=start + 11)
    assert registry.sweep(now=start + 50) == []
    registry.sweep(now=start + 101)
    assert record.state is PeerState.LEFT


def test_heartbeat_before_registration_keeps_the_peer_pending_then_registration_activates() -> None:
    registry = PeerRegistry(stale_after=10, evict_after=100)
    record = registry.heartbeat(PeerHeartbeat(peer_id="b", sequence=1, tasks_held=5))
    assert record.state is PeerState.PENDING and registry.active() == []
    registry.register(PeerRegistered(peer=info("b")))
    assert record.state is PeerState.ACTIVE and record.tasks_held == 5


def test_an_older_heartbeat_does_not_overwrite_newer_load() -> None:
    registry = PeerRegistry(stale_after=10, evict_after=100)
    registry.register(PeerRegistered(peer=info("a")))
    newer = PeerHeartbeat(peer_id="a", sequence=2, tasks_held=9)
    older = PeerHeartbeat(peer_id="a", sequence=1, tasks_held=1, sent_at=newer.sent_at - timedelta(seconds=5))
    registry.heartbeat(newer)
    registry.heartbeat(older)
    assert registry.get("a").tasks_held == 9


def test_unknown_peer_is_not_found() -> None:
    with pytest.raises(PeerNotFound):
        PeerRegistry(1, 2).get("ghost")
