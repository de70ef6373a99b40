"""Waiting in tests for what the system does a moment later (a fold, a background publish, a reap)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T | None]], timeout: float = 20.0, what: str = "condition") -> T:
    """Poll ``check`` every 50 ms until it gives something true, and return that; AssertionError naming
    ``what`` after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := await check()):
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not met in {timeout}s")
        await asyncio.sleep(0.05)
    return value
