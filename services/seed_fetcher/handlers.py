"""Bus subscribers of the seed-fetcher: seed-fetch jobs from the durable work queue."""

from __future__ import annotations

import logging

from services.seed_fetcher.fetcher import SeedFetcher
from shared.bus import Delivery
from shared.schemas import Event, SeedFetchRequested

logger = logging.getLogger(__name__)


class SeedJobHandler:
    """Runs each job; its errors become ack/nak/term through the bus's one mapping."""

    def __init__(self, fetcher: SeedFetcher) -> None:
        self.fetcher = fetcher

    async def __call__(self, event: Event, delivery: Delivery) -> None:
        if not isinstance(event, SeedFetchRequested):
            logger.warning("ignoring %s on the seed job queue", event.name)
            return
        logger.info("seed job", extra={"task_id": event.task_id, "url": event.url, "delivery": delivery.num_delivered})
        await self.fetcher.run(event)
