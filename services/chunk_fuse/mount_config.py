"""A lazy mount's configuration: Damselfly's own shape, or a nydusd ``config.json`` accepted as it is.

Two spellings of one model.  The native one (YAML or JSON)::

    backend: {mirrors: [{host: http://127.0.0.1:65001}], scheme: http, timeout: 10, retry_limit: 2}
    cache: {work_dir: /var/lib/damselfly/cache, size_limit: 10GiB}
    digest_validate: true
    prefetch: {enable: true, threads_count: 4, merging_size: 1MiB, bandwidth_rate: 0, prefetch_all: false}

and nydusd's (``device.backend.config``, ``device.cache.config.work_dir``, ``fs_prefetch``, ...), recognised
by its ``device`` key.  Keys nydusd knows but that mean nothing here (``mode``, ``iostats_files``,
``auth_through``...) are accepted and ignored; anything else is an error naming the key, as for the services.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from services.chunk_fuse.documents import read_config_document
from shared.config import StrictModel, default_workdir, describe_validation_error
from shared.errors import ConfigError

MIB = 1 << 20
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: object) -> int:
    """Bytes from an int or a string like ``128KiB``, ``1M``, ``10GiB`` (binary units)."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes, not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
    raise ValueError(f"not a size: {value!r} (bytes, or a number with K/M/G/T)")


def default_cache_dir() -> Path:
    """The chunk cache that the agent and the CLI share when no config names one."""
    return default_workdir() / "chunk_fuse" / "cache"


class MirrorConfig(StrictModel):
    """A registry mirror (the node's registry-proxy), tried before the origin while it is healthy."""

    host: str = Field(description="Mirror base URL, e.g. http://127.0.0.1:65001.")
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Headers sent to the mirror; X-Dragonfly-Registry defaults to the image's registry.",
    )
    ping_url: str | None = Field(None, description="Health URL; default HOST/v2/.")
    auth_through: bool = Field(False, description="nydusd compatibility; credentials always go to the mirror.")
    health_check_interval: float = Field(5.0, gt=0, description="Seconds between pings of ping_url.")
    failure_limit: int = Field(5, ge=0, description="nydusd compatibility; one failed request marks it unhealthy.")

    @field_validator("host")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @property
    def effective_ping_url(self) -> str:
        """Where health is checked."""
        return self.ping_url or f"{self.host}/v2/"


class BackendConfig(StrictModel):
    """Where chunks come from: the image's registry, through the mirrors first."""

    type: Literal["registry"] = "registry"
    scheme: Literal["http", "https", ""] = Field(
        "", description="Origin scheme; empty means https, or whichever answers when insecure."
    )
    skip_verify: bool = Field(False, description="Do not verify the origin's TLS certificate.")
    insecure: bool = Field(False, description="Plain HTTP or unverified TLS to the origin (probe decides).")
    timeout: float = Field(10.0, gt=0, description="Seconds for one request, body included.")
    connect_timeout: float = Field(10.0, gt=0, description="Seconds to connect.")
    retry_limit: int = Field(2, ge=0, le=20, description="Retries of a failed request to the origin.")
    mirrors: list[MirrorConfig] = Field(default_factory=list)
    auth: str | None = Field(None, description="base64 of USER:PASS (nydusd's auth); default: docker config.")


class CacheConfig(StrictModel):
    """The local chunk cache (nydusd's blobcache)."""

    type: Literal["blobcache", "none"] = "blobcache"
    work_dir: Path = Field(default_factory=default_cache_dir)
    size_limit: int = Field(0, ge=0, description="Bytes of chunks kept on disk; 0 for no limit (LRU eviction).")

    @field_validator("size_limit", mode="before")
    @classmethod
    def _size(cls, value: object) -> int:
        return parse_size(value)


class PrefetchConfig(StrictModel):
    """Background fetching (nydusd's fs_prefetch), never in the way of on-demand reads."""

    enable: bool = False
    threads_count: int = Field(4, ge=1, le=64, description="Concurrent prefetch workers.")
    merging_size: int = Field(MIB, ge=4096, description="Largest merged Range request, in bytes.")
    bandwidth_rate: int = Field(0, ge=0, description="Prefetch bytes per second; 0 for no limit.")
    prefetch_all: bool = Field(False, description="After the prefetch table, fetch the rest of every blob.")

    @field_validator("merging_size", "bandwidth_rate", mode="before")
    @classmethod
    def _size(cls, value: object) -> int:
        return parse_size(value)


class LearnedPrefetchConfig(StrictModel):
    """Learned prefetch: the first cold start records the chunks it reads, later mounts fetch them first."""

    enable: bool = True
    record_seconds: float = Field(10.0, gt=0, description="How long after mounting reads are recorded.")
    max_chunks: int = Field(100_000, ge=1, description="Longest list recorded.")


class MountConfig(StrictModel):
    """Everything one lazy mount needs besides the image and the mount point."""

    backend: BackendConfig = Field(default_factory=lambda: BackendConfig.model_validate({}))
    cache: CacheConfig = Field(default_factory=lambda: CacheConfig.model_validate({}))
    digest_validate: bool = Field(True, description="Check every chunk against its digest.")
    enable_xattr: bool = True
    amplify_io: int = Field(128 << 10, ge=0, description="Small reads grow to this many blob bytes.")
    read_ahead_kb: int = Field(1024, ge=0, le=65536, description="Kernel readahead of the mount, in KiB.")
    prefetch: PrefetchConfig = Field(default_factory=lambda: PrefetchConfig.model_validate({}))
    learned_prefetch: LearnedPrefetchConfig = Field(default_factory=lambda: LearnedPrefetchConfig.model_validate({}))

    @field_validator("amplify_io", mode="before")
    @classmethod
    def _size(cls, value: object) -> int:
        return parse_size(value)

    def with_shortcuts(self, *, mirror: str | None = None, insecure: bool = False) -> MountConfig:
        """The config with the CLI's ``--mirror`` and ``--insecure`` applied on top."""
        backend = self.backend
        if mirror:
            backend = backend.model_copy(update={"mirrors": [MirrorConfig(host=mirror)]})
        if insecure:
            backend = backend.model_copy(update={"insecure": True, "skip_verify": True, "scheme": ""})
        return self.model_copy(update={"backend": backend})


# -- nydusd's config.json ---------------------------------------------------------------------------

# Keys of nydusd's v1 config that have no meaning for this daemon; accepted so its files load as they are.
_NYDUS_IGNORED_TOP = {"mode", "iostats_files", "access_pattern", "latest_read_files", "enable_xattr_cache", "id"}
_NYDUS_IGNORED_BACKEND = {"host", "repo", "proxy", "blob_url_scheme", "blob_redirected_host", "token"}
_NYDUS_IGNORED_CACHE = {"compressed", "disable_indexed_map"}


def _take(obj: Any, where: str, known: Collection[str], ignored: Collection[str] = ()) -> dict[str, Any]:
    """``obj`` with ignored keys dropped; ConfigError naming the first unknown one."""
    if not isinstance(obj, dict):
        raise ConfigError(f"config error: '{where}' must be an object")
    for key in obj:
        if key not in known and key not in ignored:
            raise ConfigError(f"config error: unknown key '{where}.{key}'" if where else f"unknown key '{key}'")
    return {k: v for k, v in obj.items() if k in known}


def from_nydusd(document: dict[str, Any]) -> dict[str, Any]:
    """A nydusd v1 ``config.json`` translated to the native shape (validated by the caller)."""
    top = _take(
        document,
        "",
        {"device", "digest_validate", "enable_xattr", "fs_prefetch", "amplify_io"},
        _NYDUS_IGNORED_TOP,
    )
    native: dict[str, Any] = {}
    device = _take(top.get("device", {}), "device", {"backend", "cache"})
    if "backend" in device:
        backend = _take(device["backend"], "device.backend", {"type", "config"})
        if backend.get("type", "registry") != "registry":
            raise ConfigError(f"config error: backend type {backend.get('type')!r} is not supported (only registry)")
        config = _take(
            backend.get("config", {}),
            "device.backend.config",
            {"mirrors", "scheme", "skip_verify", "timeout", "connect_timeout", "retry_limit", "auth"},
            _NYDUS_IGNORED_BACKEND,
        )
        native["backend"] = config
    if "cache" in device:
        cache = _take(device["cache"], "device.cache", {"type", "config"})
        kind = cache.get("type", "blobcache") or "none"
        native_cache: dict[str, Any] = {"type": "blobcache" if kind in ("blobcache", "filecache") else kind}
        cache_config = _take(cache.get("config", {}), "device.cache.config", {"work_dir"}, _NYDUS_IGNORED_CACHE)
        if "work_dir" in cache_config:
            native_cache["work_dir"] = cache_config["work_dir"]
        native["cache"] = native_cache
    for key in ("digest_validate", "enable_xattr", "amplify_io"):
        if key in top:
            native[key] = top[key]
    if "fs_prefetch" in top:
        native["prefetch"] = _take(
            top["fs_prefetch"],
            "fs_prefetch",
            {"enable", "threads_count", "merging_size", "bandwidth_rate", "prefetch_all"},
        )
    # nydusd checks no digests unless told to; keep its default when the file does not say.
    native.setdefault("digest_validate", False)
    return native


def is_nydusd_config(document: dict[str, Any]) -> bool:
    """Whether a parsed document is nydusd's shape (it has a ``device`` block)."""
    return "device" in document or "fs_prefetch" in document


def mount_config_from_document(document: dict[str, Any], source: str = "config") -> MountConfig:
    """Validate a parsed native or nydusd document."""
    native = from_nydusd(document) if is_nydusd_config(document) else document
    try:
        return MountConfig.model_validate(native)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source)) from exc


def load_mount_config(path: Path | None) -> MountConfig:
    """Read a mount config file (JSON or YAML, native or nydusd); the defaults without one."""
    if path is None:
        return MountConfig.model_validate({})
    document = read_config_document(path)
    return mount_config_from_document(document, str(path))
