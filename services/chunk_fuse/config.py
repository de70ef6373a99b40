"""The chunk-fuse agent's configuration."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from shared.config import ServiceConfig


class ChunkFuseConfig(ServiceConfig):
    """Settings of a node's chunk-fuse agent (``DAMSELFLY_*`` variables override the YAML file)."""

    service: ClassVar[str] = "chunk_fuse"
    default_port: ClassVar[int] = 65003

    cache_dir: Path | None = Field(None, description="Local chunk cache; default in the workdir.")
    mirror_url: str | None = Field(None, description="This node's registry-proxy.")
    fuse_device: Path = Field(Path("/dev/fuse"), description="The FUSE device the mounts need.")

    @property
    def effective_cache_dir(self) -> Path:
        """Where chunks are cached."""
        return self.cache_dir or self.service_workdir / "cache"
