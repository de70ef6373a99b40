"""Knowing when a replayed stream has caught up, so a restarted scheduler answers from full state.

The scheduler's consumers are ephemeral and start at the first message of their streams. Until they
have read every message that was there at start, the peer table and the piece map are partial: a task
would look unknown and a seed fetch would be requested for a blob peers already hold. So assignments
wait for the replay (for a bounded time), and readiness reports it.
"""

from __future__ import annotations

import asyncio
import logging

import nats.errors
import nats.js.errors

from shared.bus import Bus, Delivery, Handler
from shared.schemas import Event
from shared.subjects import StreamSpec

logger = logging.getLogger(__name__)


class StreamReplay:
    """Tracks one consumer's replay of a stream up to the last message stored when it started."""

    def __init__(self, stream: StreamSpec) -> None:
        self.stream = stream
        self.target: int | None = None
        self.seen = 0
        self._done = asyncio.Event()

    @property
    def done(self) -> bool:
        """Whether every message present at start has been handled (or waiting was given up)."""
        return self._done.is_set()

    async def snapshot(self, bus: Bus) -> None:
        """Note the stream's last sequence now; call it before or while the consumer starts."""
        try:
            info = await bus.js.stream_info(self.stream.name)
        except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
            # Without a target there is nothing to wait for: answer from what arrives, as before.
            logger.warning("cannot read %s to track its replay: %r", self.stream.name, exc)
            self._done.set()
            return
        self.target = info.state.last_seq if info.state.messages else 0
        self._check()

    def observe(self, stream_sequence: int) -> None:
        """A message was handled (whatever the outcome)."""
        self.seen = max(self.seen, stream_sequence)
        self._check()

    def _check(self) -> None:
        if self.target is not None and self.seen >= self.target and not self._done.is_set():
            self._done.set()
            logger.info("replayed %s up to sequence %d", self.stream.name, self.target)

    def wrap(self, handler: Handler) -> Handler:
        """``handler``, observing each message's stream sequence after it ran (or raised)."""

        async def observed(event: Event, delivery: Delivery) -> None:
            try:
                await handler(event, delivery)
            finally:
                self.observe(delivery.stream_sequence)

        return observed

    async def wait(self, timeout: float) -> bool:
        """Wait for the replay; after ``timeout`` give up (a message may have aged out) and say so."""
        if self._done.is_set():
            return True
        try:
            await asyncio.wait_for(self._done.wait(), timeout)
            return True
        except TimeoutError:
            if not self._done.is_set():
                logger.warning(
                    "replay of %s not caught up after %.1fs (at %d of %s); answering from what is known",
                    self.stream.name,
                    timeout,
                    self.seen,
                    self.target,
                )
                self._done.set()
            return False
