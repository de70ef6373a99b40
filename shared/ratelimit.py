"""Byte rate limits (uploads to peers, downloads from peers, back-to-source fetches)."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """A byte rate limit: ``rate`` bytes/s on average, bursts up to ``capacity`` bytes.

    Takers queue in order (the lock is held while waiting), so one upload cannot starve the others.
    A take larger than what is left borrows: the bucket goes negative and the taker waits off the debt.
    """

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self._tokens = capacity
        self._updated = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, amount: int) -> None:
        """Wait until ``amount`` bytes may be sent."""
        async with self._lock:
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
            self._updated = now
            self._tokens -= amount
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self.rate)


def bucket_for(rate_bytes_per_second: int) -> TokenBucket | None:
    """A bucket with one second of burst, or None when the rate is 0 (unlimited)."""
    if rate_bytes_per_second <= 0:
        return None
    return TokenBucket(rate_bytes_per_second, rate_bytes_per_second)
