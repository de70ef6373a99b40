"""The seed-fetcher's configuration."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from shared.config import ServiceConfig


class SeedFetcherConfig(ServiceConfig):
    """Settings of a seed-fetcher (``DAMSELFLY_*`` variables override the YAML file)."""

    service: ClassVar[str] = "seed_fetcher"
    default_port: ClassVar[int] = 8003

    seed_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,128}$", description="Default: seed-<node_name>.")
    storage_dir: Path | None = Field(None, description="The seed's own piece store; default in the workdir.")
    allowed_registries: list[str] = Field(default_factory=list, description="Origins the seed may fetch from.")
    parallel_ranges: int = Field(4, ge=1, le=64, description="Range requests in flight per blob.")
    max_attempts: int = Field(5, ge=1, description="Tries per piece on 5xx, 429 and timeouts.")

    @property
    def effective_storage_dir(self) -> Path:
        """Where fetched pieces are stored."""
        return self.storage_dir or self.service_workdir / "pieces"
