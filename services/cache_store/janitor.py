"""Keeps the store within bounds: evicts idle and least recently used tasks, and tracks the store's size."""

from __future__ import annotations

import asyncio
import logging

from services.cache_store.metrics import CacheStoreMetrics
from shared.errors import DamselflyError
from shared.piece_store import PieceStore, StoreUsage

logger = logging.getLogger(__name__)


class CacheJanitor:
    """Runs garbage collection every ``gc_interval`` s and refreshes the usage figures more often.

    The usage figures feed the heartbeat's ``tasks_held`` and the disk-usage gauge; reading them from
    the database once per ``refresh_interval`` keeps the heartbeat (a plain callback) off the database.
    """

    def __init__(
        self,
        store: PieceStore,
        metrics: CacheStoreMetrics,
        *,
        gc_interval: float,
        refresh_interval: float,
        ttl_seconds: float,
        high_watermark_bytes: int,
        low_watermark_bytes: int,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.gc_interval = gc_interval
        self.refresh_interval = refresh_interval
        self.ttl_seconds = ttl_seconds
        self.high_watermark_bytes = high_watermark_bytes
        self.low_watermark_bytes = low_watermark_bytes
        self.usage = StoreUsage(bytes_on_disk=0, task_count=0, piece_count=0)

    @property
    def tasks_held(self) -> int:
        """Tasks in the store as of the last refresh."""
        return self.usage.task_count

    async def refresh(self) -> StoreUsage:
        """Read the store's usage now."""
        self.usage = await asyncio.to_thread(self.store.usage)
        self.metrics.disk_usage_bytes.set(self.usage.bytes_on_disk)
        self.metrics.tasks_held.set(self.usage.task_count)
        return self.usage

    async def collect(self) -> list[str]:
        """One garbage collection; returns the evicted task ids."""
        evicted = await asyncio.to_thread(
            lambda: self.store.collect_garbage(
                ttl_seconds=self.ttl_seconds,
                high_watermark_bytes=self.high_watermark_bytes,
                low_watermark_bytes=self.low_watermark_bytes,
            )
        )
        if evicted:
            self.metrics.evictions.inc(len(evicted))
            logger.info("evicted %d tasks", len(evicted), extra={"tasks": evicted[:20]})
        await self.refresh()
        return evicted

    async def run(self) -> None:
        """Refresh and collect forever; a failed round is logged and the next one tried."""
        loop = asyncio.get_running_loop()
        next_gc = loop.time()
        while True:
            try:
                if loop.time() >= next_gc:
                    next_gc = loop.time() + self.gc_interval
                    await self.collect()
                else:
                    await self.refresh()
            except DamselflyError as exc:
                logger.warning("cache maintenance failed: %s", exc)
            except Exception:
                # Anything else is a bug, but the store must keep being bounded: log it, try again later.
                logger.exception("cache maintenance failed")
            await asyncio.sleep(max(0.0, min(self.refresh_interval, next_gc - loop.time())))
