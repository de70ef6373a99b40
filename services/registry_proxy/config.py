"""The registry-proxy's configuration, shaped like Dragonfly's dfdaemon ``proxy`` block."""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from services.cache_store.config import peer_id_from
from shared.config import ServiceConfig, StrictModel
from shared.registry_client import normalise_origin


class RegistryMirror(StrictModel):
    """The default upstream (Dragonfly's ``registryMirror``)."""

    url: str = Field("https://index.docker.io", description="Origin used when a request names none.")
    dynamic: bool = Field(True, description="Honour the X-Dragonfly-Registry header and containerd's ?ns=.")
    insecure: bool = Field(False, description="Skip TLS verification towards the origin.")

    @field_validator("url")
    @classmethod
    def _is_http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")


class ProxyRule(StrictModel):
    """A URL pattern that goes through P2P (Dragonfly's ``proxies`` entries)."""

    regx: str
    direct: bool = Field(False, description="Matching requests go straight to the origin, not P2P.")

    @field_validator("regx")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from exc
        return value


class RegistryProxyConfig(ServiceConfig):
    """Settings of a node's registry-proxy (``DAMSELFLY_*`` variables override the YAML file)."""

    service: ClassVar[str] = "registry_proxy"
    default_port: ClassVar[int] = 65001

    registry_mirror: RegistryMirror = Field(default_factory=lambda: RegistryMirror.model_validate({}))
    allowed_registries: list[str] = Field(
        default_factory=list,
        description="Origins (scheme://host[:port]) that may be reached; the mirror URL is always allowed.",
    )
    proxies: list[ProxyRule] = Field(default_factory=lambda: [ProxyRule(regx="blobs/sha256.*")])
    default_filter: str = Field("Expires&Signature&ns", description="Query parameters left out of task ids.")
    prefetch: bool = Field(True, description="After a Range request, fetch the rest of the blob in the background.")
    cache_store_url: str | None = Field(None, description="This node's cache-store.")
    peer_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_-]{1,128}$", description="This node's peer id (its cache-store's)."
    )
    storage_dir: Path | None = Field(None, description="This node's piece store, shared with its cache-store.")
    database_url: str | None = Field(None, description="The piece store's database; default SQLite in storage_dir.")
    parallel_pieces: int = Field(4, ge=1, le=64, description="Pieces fetched from parents at once per task.")
    piece_timeout_seconds: float = Field(30.0, gt=0, description="Give up on a parent for a piece after this long.")
    manifest_cache_entries: int = Field(1024, ge=0, description="Manifests kept by digest.")
    blob_check_seconds: float = Field(
        30.0,
        ge=0,
        description=(
            "How long the origin's answer to a blob HEAD (the client may read it; its size) is trusted for "
            "further ranges of that blob with the same credentials; 0 asks every time."
        ),
    )
    download_rate_limit_bytes: int = Field(0, ge=0, description="Bytes/s this node takes from peers; 0: no limit.")

    @property
    def effective_peer_id(self) -> str:
        """This node's peer id."""
        return self.peer_id or peer_id_from(self.node_name)

    @property
    def effective_storage_dir(self) -> Path:
        """The node's piece store."""
        return self.storage_dir or self.workdir / "cache_store" / "pieces"

    @property
    def allowed_origins(self) -> set[str]:
        """Every origin this proxy may reach (normalised scheme://host:port, lower case)."""
        return {normalise_origin(url) for url in [self.registry_mirror.url, *self.allowed_registries]}
