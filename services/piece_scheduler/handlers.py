"""Bus subscribers of the scheduler: peer lifecycle events fold into the peer table, task events into the
piece map."""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.engine import Engine
from sqlmodel import Session

from services.piece_scheduler.metrics import SchedulerMetrics
from services.piece_scheduler.models import upsert_peer
from services.piece_scheduler.peer_registry import PeerRecord, PeerRegistry
from services.piece_scheduler.task_map import TaskMap
from shared.bus import Delivery
from shared.schemas import Event, PeerHeartbeat, PeerLeft, PeerRegistered
from shared.schemas.events import utcnow
from shared.subjects import PEERS_STREAM, TASKS_STREAM, ConsumerSpec, DeliverFrom

logger = logging.getLogger(__name__)

# Ephemeral and replayed from the start of the (one-message-per-subject) stream at every start: that
# replay is how a restarted scheduler rebuilds its peer table without peers registering again.
PEER_EVENTS_CONSUMER = ConsumerSpec(
    stream=PEERS_STREAM,
    filter_subjects=PEERS_STREAM.subjects,
    durable=None,
    deliver_from=DeliverFrom.ALL,
    ack_wait_seconds=10.0,
    max_deliver=5,
    batch=256,
    description="Scheduler replica: peer lifecycle, replayed at start.",
)

# The same for the piece map: every replica folds the whole TASKS stream from its start, so a restarted
# scheduler knows every task, holder, bad parent and seed attempt without anyone announcing again.
TASK_EVENTS_CONSUMER = ConsumerSpec(
    stream=TASKS_STREAM,
    filter_subjects=TASKS_STREAM.subjects,
    durable=None,
    deliver_from=DeliverFrom.ALL,
    ack_wait_seconds=10.0,
    max_deliver=5,
    batch=256,
    description="Scheduler replica: tasks, pieces and seed completions, replayed at start.",
)


class PeerEventHandler:
    """Applies peer events to the registry and records state changes in the database."""

    def __init__(self, registry: PeerRegistry, engine: Engine) -> None:
        self.registry = registry
        self.engine = engine

    async def __call__(self, event: Event, delivery: Delivery) -> None:
        if isinstance(event, PeerRegistered):
            record = self.registry.register(event)
            logger.info("peer registered", extra={"peer_id": record.peer_id})
            await self.persist([record])
        elif isinstance(event, PeerHeartbeat):
            before = self.registry.find(event.peer_id)
            state_before = before.state if before else None
            record = self.registry.heartbeat(event)
            if record.state is not state_before:
                await self.persist([record])
        elif isinstance(event, PeerLeft):
            record = self.registry.leave(event)
            logger.info("peer left", extra={"peer_id": record.peer_id, "reason": event.reason.value})
            await self.persist([record])
        else:
            logger.debug("ignoring %s on %s", event.name, delivery.subject)

    async def persist(self, records: list[PeerRecord]) -> None:
        """Write the records' rows, off the event loop."""
        await asyncio.to_thread(self._persist_sync, records)

    def _persist_sync(self, records: list[PeerRecord]) -> None:
        now = utcnow()
        with Session(self.engine) as session:
            for record in records:
                upsert_peer(session, record, now)
            session.commit()


class TaskEventHandler:
    """Folds task, piece and seed-completion events into the piece map."""

    def __init__(self, tasks: TaskMap, metrics: SchedulerMetrics | None = None) -> None:
        self.tasks = tasks
        self.metrics = metrics

    async def __call__(self, event: Event, delivery: Delivery) -> None:
        before = self.tasks.back_to_source_total
        task = self.tasks.apply(event)
        if task is None:
            logger.debug("ignoring %s on %s", event.name, delivery.subject)
            return
        if self.metrics and self.tasks.back_to_source_total > before:
            self.metrics.back_to_source.inc(self.tasks.back_to_source_total - before)


async def sweep_peers(handler: PeerEventHandler, interval: float) -> None:
    """Mark silent peers stale or left, forever."""
    while True:
        await asyncio.sleep(interval)
        changed = handler.registry.sweep()
        if changed:
            for record in changed:
                logger.info("peer %s is now %s", record.peer_id, record.state.value)
            await handler.persist(changed)
