"""The cache-store's configuration."""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

from pydantic import Field

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
    upload_slots: int = Field(50, ge=1)
    heartbeat_interval_seconds: float = Field(5.0, gt=0)
    storage_dir: Path | None = Field(None, description="Where pieces live; default <workdir>/cache_store/pieces.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default a SQLite file in the workdir.")

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
        """The configured database, or the store's SQLite file."""
        return self.database_url or sqlite_url(self.service_workdir / "cache_store.db")

    @property
    def upload_url(self) -> str:
        """The base URL other peers fetch pieces from."""
        host = self.advertise_host or ("127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host)
        return f"http://{host}:{self.bind_port}"
