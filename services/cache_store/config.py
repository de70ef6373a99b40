"""The cache-store's configuration."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import ClassVar, Self

from pydantic import Field, model_validator

from shared.config import ServiceConfig
from shared.db import sqlite_url


def peer_id_from(name: str) -> str:
    """A valid peer id made from a node name (dots and other characters become dashes)."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")
    return (cleaned or "peer")[:128]


class CacheStoreConfig(ServiceConfig):
    """Settings of a node's cache-store (``DAMSELFLY_*`` variables override the YAML file)."""

    service: ClassVar[str] = "cache_store"
    default_port: ClassVar[int] = 40901

    peer_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,128}$", description="Default: from node_name.")
    advertise_host: str | None = Field(None, description="Host other peers use to reach this one; default: host.")
    proxy_url: str | None = Field(None, description="This node's registry-proxy, announced to the scheduler.")
    idc: str = ""
    location: str = ""
    is_seed: bool = False
    upload_slots: int = Field(50, ge=1, description="Concurrent uploads; more are answered 503 (Retry-After: 1).")
    upload_rate_limit_bytes: int = Field(0, ge=0, description="Upload bandwidth of the node, bytes/s; 0: no limit.")
    upload_chunk_bytes: int = Field(
        1024 * 1024, ge=64 * 1024, le=16 * 1024 * 1024, description="Bytes read and sent at a time per upload."
    )
    heartbeat_interval_seconds: float = Field(5.0, gt=0)
    storage_dir: Path | None = Field(None, description="Where pieces live; default <workdir>/cache_store/pieces.")
    database_url: str | None = Field(None, description="The piece store's database; default SQLite in storage_dir.")
    gc_interval_seconds: float = Field(60.0, gt=0, description="How often garbage collection runs.")
    gc_ttl_seconds: float = Field(6 * 3600.0, gt=0, description="Tasks not accessed for this long are evicted.")
    gc_write_grace_seconds: float = Field(
        10.0, ge=0, description="A task written this recently is never evicted: a download is under way."
    )
    # The store's own size (the bytes of the pieces it holds) is what the watermarks bound. In bytes when
    # set, else as a percentage of the size of the file system that holds storage_dir.
    disk_high_watermark_bytes: int | None = Field(
        None, ge=0, description="Above this many bytes held, LRU tasks are evicted; default: the percentage."
    )
    disk_low_watermark_bytes: int | None = Field(
        None, ge=0, description="Eviction by size stops at this many bytes held; default: the percentage."
    )
    disk_high_watermark_percent: float = Field(
        80.0, gt=0, le=100, description="High watermark as a percentage of the storage file system's size."
    )
    disk_low_watermark_percent: float = Field(
        70.0, gt=0, le=100, description="Low watermark as a percentage of the storage file system's size."
    )

    @model_validator(mode="after")
    def _watermarks_ordered(self) -> Self:
        if self.disk_low_watermark_percent > self.disk_high_watermark_percent:
            raise ValueError("disk_low_watermark_percent must not exceed disk_high_watermark_percent")
        high, low = self.disk_high_watermark_bytes, self.disk_low_watermark_bytes
        if high is not None and low is not None and low > high:
            raise ValueError("disk_low_watermark_bytes must not exceed disk_high_watermark_bytes")
        return self

    @property
    def effective_peer_id(self) -> str:
        """This node's peer id."""
        return self.peer_id or peer_id_from(self.node_name)

    @property
    def effective_storage_dir(self) -> Path:
        """The piece directory."""
        return self.storage_dir or self.service_workdir / "pieces"

    @property
    def effective_database_url(self) -> str:
        """The configured database, or the store's SQLite file in storage_dir (PieceStore's own default).

        The node's registry-proxy and seed-fetcher open the same store with the same default, so the
        three processes share one database without configuring it.
        """
        return self.database_url or sqlite_url(self.effective_storage_dir / "store.db")

    def watermarks(self) -> tuple[int, int]:
        """(high, low) watermarks in bytes: the configured bytes, else percentages of the storage disk."""
        high, low = self.disk_high_watermark_bytes, self.disk_low_watermark_bytes
        if high is None or low is None:
            # The nearest existing directory is on the same file system the storage dir will be on.
            where = self.effective_storage_dir
            while not where.exists() and where != where.parent:
                where = where.parent
            total = shutil.disk_usage(where).total
            if high is None:
                high = int(total * self.disk_high_watermark_percent / 100)
            if low is None:
                low = int(total * self.disk_low_watermark_percent / 100)
        return high, min(low, high)

    @property
    def upload_url(self) -> str:
        """The base URL other peers fetch pieces from."""
        host = self.advertise_host or ("127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host)
        return f"http://{host}:{self.bind_port}"
