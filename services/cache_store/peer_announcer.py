"""Tells the scheduler this node exists: registers at start, heartbeats, and leaves at shutdown."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable

from shared.bus import Bus
from shared.errors import DependencyUnavailable
from shared.schemas import PeerHeartbeat, PeerInfo, PeerLeft, PeerRegistered

logger = logging.getLogger(__name__)


class PeerAnnouncer:
    """Publishes this peer's lifecycle events; registration is repeated until NATS has it."""

    def __init__(
        self,
        bus: Bus,
        info: PeerInfo,
        interval: float,
        load: Callable[[], tuple[int, int]],
        storage_path: str,
    ) -> None:
        self.bus = bus
        self.info = info
        self.interval = interval
        self.load = load
        self.storage_path = storage_path
        self._sequence = 0
        self.registered = asyncio.Event()

    async def run(self) -> None:
        """Register, then heartbeat every interval; rides out NATS outages."""
        while not self.registered.is_set():
            try:
                await self.bus.publish(PeerRegistered(peer=self.info))
                self.registered.set()
                logger.info("registered as peer", extra={"peer_id": self.info.peer_id})
            except DependencyUnavailable as exc:
                logger.warning("registration deferred: %s", exc)
                await asyncio.sleep(min(self.interval, 1.0))
        while True:
            await asyncio.sleep(self.interval)
            await self.beat()

    async def beat(self) -> None:
        """Publish one heartbeat with the current load (skipped while NATS is away)."""
        self._sequence += 1
        slots_in_use, tasks_held = self.load()
        try:
            free = shutil.disk_usage(self.storage_path).free
        except OSError:
            free = None
        try:
            await self.bus.publish(
                PeerHeartbeat(
                    peer_id=self.info.peer_id,
                    sequence=self._sequence,
                    upload_slots_in_use=slots_in_use,
                    tasks_held=tasks_held,
                    disk_free_bytes=free,
                )
            )
        except DependencyUnavailable as exc:
            logger.debug("heartbeat skipped: %s", exc)

    async def leave(self) -> None:
        """Say goodbye, best effort (the scheduler evicts silent peers anyway)."""
        try:
            await asyncio.wait_for(self.bus.publish(PeerLeft(peer_id=self.info.peer_id)), timeout=2.0)
        except (DependencyUnavailable, TimeoutError) as exc:
            logger.warning("could not announce leaving: %s", exc)
