"""The scheduler's peer table: each peer's info, load and lifecycle state.

The table is a fold over the PEERS stream (registrations, heartbeats, leaves), so after a restart the
scheduler rebuilds it by replaying the stream; peers need not register again.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from datetime import datetime

from shared.errors import PeerNotFound
from shared.fsm import TransitionTable
from shared.schemas import PeerHeartbeat, PeerInfo, PeerLeft, PeerRegistered


class PeerState(enum.Enum):
    """Lifecycle of a peer as the scheduler sees it."""

    PENDING = "pending"  # Known by id only (a heartbeat arrived before its registration was replayed).
    ACTIVE = "active"  # Registered and heartbeating: a candidate parent.
    STALE = "stale"  # Heartbeats stopped for a while: not offered as a parent until one arrives.
    LEFT = "left"  # Said goodbye, or silent long enough to be evicted.


class PeerEvent(enum.Enum):
    """What can happen to a peer."""

    REGISTER = "register"
    HEARTBEAT = "heartbeat"
    TIMEOUT = "timeout"
    EVICT = "evict"
    LEAVE = "leave"


PEER_FSM: TransitionTable[PeerState, PeerEvent] = TransitionTable(
    "peer",
    {
        (PeerState.PENDING, PeerEvent.REGISTER): PeerState.ACTIVE,
        (PeerState.PENDING, PeerEvent.LEAVE): PeerState.LEFT,
        (PeerState.ACTIVE, PeerEvent.REGISTER): PeerState.ACTIVE,  # Re-registration after a restart.
        (PeerState.ACTIVE, PeerEvent.HEARTBEAT): PeerState.ACTIVE,
        (PeerState.ACTIVE, PeerEvent.TIMEOUT): PeerState.STALE,
        (PeerState.ACTIVE, PeerEvent.LEAVE): PeerState.LEFT,
        (PeerState.STALE, PeerEvent.REGISTER): PeerState.ACTIVE,
        (PeerState.STALE, PeerEvent.HEARTBEAT): PeerState.ACTIVE,
        (PeerState.STALE, PeerEvent.EVICT): PeerState.LEFT,
        (PeerState.STALE, PeerEvent.LEAVE): PeerState.LEFT,
        (PeerState.LEFT, PeerEvent.REGISTER): PeerState.ACTIVE,  # A peer that left may come back.
    },
)


@dataclass
class PeerRecord:
    """One peer in the table."""

    peer_id: str
    state: PeerState
    info: PeerInfo | None = None
    registered_at: datetime | None = None
    last_heartbeat_at: datetime | None = None
    # Monotonic time of the last sign of life, for stale/evict sweeps (wall clocks of peers may differ).
    last_seen_monotonic: float = field(default_factory=time.monotonic)
    upload_slots_in_use: int = 0
    tasks_held: int = 0
    disk_free_bytes: int | None = None

    def apply(self, event: PeerEvent) -> None:
        """Move to the state ``event`` leads to (InvalidStateTransition if it is not allowed)."""
        self.state = PEER_FSM.next_state(self.state, event)


class PeerRegistry:
    """Peers by id; the handlers feed it events, the API and the assignment service read it."""

    def __init__(self, stale_after: float, evict_after: float) -> None:
        self.stale_after = stale_after
        self.evict_after = evict_after
        self._peers: dict[str, PeerRecord] = {}

    def _record(self, peer_id: str) -> PeerRecord:
        record = self._peers.get(peer_id)
        if record is None:
            record = PeerRecord(peer_id=peer_id, state=PeerState.PENDING)
            self._peers[peer_id] = record
        return record

    def register(self, event: PeerRegistered) -> PeerRecord:
        """A registration: the peer is active with the info it sent."""
        record = self._record(event.peer.peer_id)
        record.apply(PeerEvent.REGISTER)
        record.info = event.peer
        record.registered_at = event.registered_at
        record.last_seen_monotonic = time.monotonic()
        return record

    def heartbeat(self, event: PeerHeartbeat) -> PeerRecord:
        """A heartbeat: the peer is alive, with this load.

        A heartbeat of an unknown peer is kept (state PENDING) so its registration, if replayed later,
        finds the load already known; a heartbeat of a peer that left is an illegal transition.
        """
        record = self._record(event.peer_id)
        if record.state is not PeerState.PENDING:
            record.apply(PeerEvent.HEARTBEAT)
        if record.last_heartbeat_at is None or event.sent_at >= record.last_heartbeat_at:
            record.last_heartbeat_at = event.sent_at
            record.upload_slots_in_use = event.upload_slots_in_use
            record.tasks_held = event.tasks_held
            record.disk_free_bytes = event.disk_free_bytes
        record.last_seen_monotonic = time.monotonic()
        return record

    def leave(self, event: PeerLeft) -> PeerRecord:
        """A peer left."""
        record = self._record(event.peer_id)
        record.apply(PeerEvent.LEAVE)
        return record

    def sweep(self, now: float | None = None) -> list[PeerRecord]:
        """Mark silent peers stale, and long-silent ones left; returns the records that changed."""
        now = time.monotonic() if now is None else now
        changed = []
        for record in self._peers.values():
            silent_for = now - record.last_seen_monotonic
            if record.state is PeerState.ACTIVE and silent_for > self.stale_after:
                record.apply(PeerEvent.TIMEOUT)
                changed.append(record)
            elif record.state is PeerState.STALE and silent_for > self.evict_after:
                record.apply(PeerEvent.EVICT)
                changed.append(record)
        return changed

    def find(self, peer_id: str) -> PeerRecord | None:
        """The peer with this id, or None."""
        return self._peers.get(peer_id)

    def get(self, peer_id: str) -> PeerRecord:
        """The peer with this id, or PeerNotFound."""
        try:
            return self._peers[peer_id]
        except KeyError:
            raise PeerNotFound(f"no peer {peer_id!r}", peer_id=peer_id) from None

    def all(self) -> list[PeerRecord]:
        """Every peer, sorted by id."""
        return [self._peers[key] for key in sorted(self._peers)]

    def active(self) -> list[PeerRecord]:
        """Peers that may be offered as parents."""
        return [record for record in self.all() if record.state is PeerState.ACTIVE and record.info is not None]
