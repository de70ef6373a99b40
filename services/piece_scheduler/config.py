"""The scheduler's configuration."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from shared.config import ServiceConfig
from shared.db import sqlite_url


class SchedulerConfig(ServiceConfig):
    """Settings of the piece-scheduler (``DAMSELFLY_*`` variables override the YAML file)."""

    service: ClassVar[str] = "scheduler"
    default_port: ClassVar[int] = 8002

    database_url: str | None = Field(None, description="SQLAlchemy URL; default a SQLite file in the workdir.")
    peer_stale_after_seconds: float = Field(15.0, gt=0, description="No heartbeat this long: peer is stale.")
    peer_evict_after_seconds: float = Field(120.0, gt=0, description="No heartbeat this long: peer has left.")
    sweep_interval_seconds: float = Field(2.0, gt=0)

    @property
    def effective_database_url(self) -> str:
        """The configured database, or the scheduler's SQLite file."""
        return self.database_url or sqlite_url(self.service_workdir / "scheduler.db")
