"""The scheduler's configuration."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, SecretStr

from shared.config import ServiceConfig, StrictModel
from shared.db import sqlite_url


class AdminApiConfig(StrictModel):
    """Who may use the admin API (``/api/v1``): a bearer token for changes, and optionally for reads."""

    token: SecretStr | None = Field(
        None, description="Bearer token for mutating endpoints (preheat). Unset: they answer 401."
    )
    open_reads: bool = Field(
        False, description="Serve read endpoints without the token. Without a token configured reads are open."
    )
    max_page_size: int = Field(1000, ge=1, description="Largest page a list endpoint returns.")
    preheat_resolve_timeout_seconds: float = Field(
        60.0, gt=0, description="How long a seed may take to resolve an image's manifests."
    )


class SchedulerConfig(ServiceConfig):
    """Settings of the piece-scheduler (``DAMSELFLY_*`` variables override the YAML file)."""

    service: ClassVar[str] = "scheduler"
    default_port: ClassVar[int] = 8002

    database_url: str | None = Field(None, description="SQLAlchemy URL; default a SQLite file in the workdir.")
    peer_stale_after_seconds: float = Field(15.0, gt=0, description="No heartbeat this long: peer is stale.")
    peer_evict_after_seconds: float = Field(120.0, gt=0, description="No heartbeat this long: peer has left.")
    sweep_interval_seconds: float = Field(2.0, gt=0)

    # Assignments.
    max_parents_per_piece: int = Field(4, ge=1, description="Parents offered per piece, best first.")
    max_pieces_per_reply: int = Field(
        1024, ge=1, description="Pieces assigned per reply (keeps a reply under NATS' 1 MiB payload)."
    )
    retry_after_ms: int = Field(100, ge=0, description="What a requester is told to wait for missing pieces.")
    replay_wait_seconds: float = Field(
        10.0, gt=0, description="At start, answer assignments only after replaying this long at most."
    )
    # Back to source.
    seed_fetch_timeout_seconds: float = Field(
        900.0, gt=0, description="A seed fetch not completed after this long is requested again."
    )
    seed_retry_backoff_seconds: float = Field(
        2.0, ge=0, description="Wait after a failed seed fetch before the next attempt (doubles per failure)."
    )
    seed_retry_backoff_max_seconds: float = Field(60.0, ge=0)
    # Bad parents.
    parent_cooldown_seconds: float = Field(
        30.0, ge=0, description="A parent that timed out or refused is skipped this long."
    )
    slow_parent_memory_seconds: float = Field(
        300.0, ge=0, description="A parent judged slow on its last cost is forgiven this long after it."
    )

    # Admin API.
    api: AdminApiConfig = Field(default_factory=AdminApiConfig)

    @property
    def effective_database_url(self) -> str:
        """The configured database, or the scheduler's SQLite file."""
        return self.database_url or sqlite_url(self.service_workdir / "scheduler.db")
