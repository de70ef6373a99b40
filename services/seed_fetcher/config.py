"""The seed-fetcher's configuration."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from services.cache_store.config import peer_id_from
from shared.config import ServiceConfig


class SeedFetcherConfig(ServiceConfig):
    """Settings of a seed-fetcher (``DAMSELFLY_*`` variables override the YAML file).

    The seed node also runs a cache-store (``is_seed: true``) with the same ``storage_dir``,
    ``database_url`` and peer id: the fetcher writes pieces there once, the cache-store serves them.
    """

    service: ClassVar[str] = "seed_fetcher"
    default_port: ClassVar[int] = 8003

    seed_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,128}$", description="Default: from node_name.")
    storage_dir: Path | None = Field(None, description="The seed node's piece store (shared with its cache-store).")
    database_url: str | None = Field(None, description="The piece store's database; default SQLite in storage_dir.")
    allowed_registries: list[str] = Field(default_factory=list, description="Origins the seed may fetch from.")
    parallel_ranges: int = Field(4, ge=1, le=64, description="Range requests in flight per blob.")
    max_attempts: int = Field(5, ge=1, description="Tries per request on 5xx, 429 and timeouts.")
    insecure: bool = Field(False, description="Skip TLS verification towards origins.")
    on_demand_idle_seconds: float = Field(
        15.0,
        gt=0,
        description="An on-demand job (a lazy reader's ranges) ends after this long without a new piece wanted.",
    )
    back_to_source_rate_limit_bytes: int = Field(0, ge=0, description="Bytes/s taken from origins; 0: no limit.")

    @property
    def effective_seed_id(self) -> str:
        """The seed's peer id (the holder of the pieces it announces)."""
        return self.seed_id or peer_id_from(self.node_name)

    @property
    def effective_storage_dir(self) -> Path:
        """Where fetched pieces are stored."""
        return self.storage_dir or self.service_workdir / "pieces"
