"""Waiting in tests for what the system does a moment later (a fold, a background publish, a reap)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``check`` every 50 ms until it is true; AssertionError naming ``what`` after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not met in {timeout}s")
        await asyncio.sleep(0.05)
