"""Run services in-process for tests: the real app and lifespan, requests through an ASGI transport."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
from fastapi import FastAPI

from shared.config import ServiceConfig

ConfigT = TypeVar("ConfigT", bound=ServiceConfig)


def service_config(config_cls: type[ConfigT], workdir: Path, nats_url: str, **values: Any) -> ConfigT:
    """A config for a test: its own workdir, the test's NATS, short timeouts."""
    nats = {"url": nats_url, "connect_timeout": 1.0, "request_timeout": 2.0}
    nats.update(values.pop("nats", {}))
    return config_cls(workdir=workdir, nats=nats, **values)


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Enter the app's lifespan (its composition root) and yield an HTTP client bound to it."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            yield client
