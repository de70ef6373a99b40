"""Byte rate limits."""

from __future__ import annotations

import asyncio
import time

from shared.ratelimit import TokenBucket, bucket_for


async def test_a_bucket_holds_takers_to_its_rate_after_the_burst() -> None:
    bucket = TokenBucket(rate=1_000_000, capacity=100_000)
    started = time.monotonic()
    for _ in range(4):
        await bucket.take(100_000)  # The first is the burst; the next three cost 0.1 s each.
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 1.0


async def test_concurrent_takers_share_the_rate() -> None:
    bucket = TokenBucket(rate=2_000_000, capacity=1)
    started = time.monotonic()
    await asyncio.gather(*(bucket.take(200_000) for _ in range(5)))
    assert time.monotonic() - started >= 0.45


def test_zero_means_unlimited() -> None:
    assert bucket_for(0) is None
    bucket = bucket_for(5)
    assert bucket is not None and bucket.rate == 5 and bucket.capacity == 5
