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
    cache_size_limit: int = Field(0, ge=0, description="Bytes of chunks kept on disk; 0 for no limit.")
    mirror_url: str | None = Field(None, description="This node's registry-proxy: mounts go through it by default.")
    fuse_device: Path = Field(Path("/dev/fuse"), description="The FUSE device the mounts need.")
    run_dir: Path | None = Field(
        None, description="Mount records, sockets and daemon logs; default /run/damselfly (root) or a user dir."
    )
    learned_prefetch: bool = Field(True, description="Share learned prefetch lists over NATS (JetStream KV).")
    poll_seconds: float = Field(1.0, gt=0, description="How often mounts' stats and traces are collected.")
    mount_timeout: float = Field(120.0, gt=0, description="Seconds a mount may take to become ready.")
    warm_standby: bool = Field(
        True,
        description="Keep one mount daemon started ahead of need, so a mount does not wait for its imports.",
    )
    keep_mounts_seconds: float = Field(
        300.0,
        ge=0,
        description="Keep an image mounted this long after its last user is done, so the next run of the same "
        "image and config starts without a mount (as nydus-snapshotter keeps an image's mount); 0 to unmount "
        "at once.",
    )
    unmount_on_shutdown: bool = Field(
        False, description="Unmount this agent's mounts when it stops (by default they outlive it, like nydusd)."
    )

    @property
    def effective_cache_dir(self) -> Path:
        """Where chunks are cached."""
        return self.cache_dir or self.service_workdir / "cache"
