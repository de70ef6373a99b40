"""Which origin a mirror request goes to, whether it may, and whether it goes through P2P.

The origin is, in order: the ``X-Dragonfly-Registry`` header, containerd's ``ns`` query parameter
(both only with ``registry_mirror.dynamic``), else the configured ``registry_mirror.url``. Only origins
on the allow-list are reached (the mirror URL always is): anything else is 403, so a node's mirror is
never an open proxy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from services.registry_proxy.config import RegistryProxyConfig
from shared.errors import Forbidden
from shared.registry_client import normalise_origin
from shared.tasks import parse_filter

REGISTRY_HEADER = "X-Dragonfly-Registry"
# containerd names Docker Hub "docker.io"; its registry API lives elsewhere.
_HOST_ALIASES = {"docker.io": "index.docker.io", "registry-1.docker.io": "index.docker.io"}


@dataclass(frozen=True)
class ProxyPolicy:
    """The proxy's routing rules, compiled once from config."""

    default_origin: str
    dynamic: bool
    allowed: frozenset[str]
    allowed_urls: tuple[str, ...]
    p2p_rules: tuple[re.Pattern[str], ...]
    direct_rules: tuple[re.Pattern[str], ...]
    filters: tuple[str, ...]

    @classmethod
    def from_config(cls, config: RegistryProxyConfig) -> ProxyPolicy:
        """Compile the config's rules."""
        return cls(
            default_origin=config.registry_mirror.url,
            dynamic=config.registry_mirror.dynamic,
            allowed=frozenset(config.allowed_origins),
            allowed_urls=tuple(url.rstrip("/") for url in [config.registry_mirror.url, *config.allowed_registries]),
            p2p_rules=tuple(re.compile(rule.regx) for rule in config.proxies if not rule.direct),
            direct_rules=tuple(re.compile(rule.regx) for rule in config.proxies if rule.direct),
            filters=parse_filter(config.default_filter),
        )

    def origin_for(self, header: str | None, ns: str | None) -> str:
        """The origin base URL for a request, or Forbidden when it is not allowed."""
        if self.dynamic and header:
            origin = header.strip().rstrip("/")
            if "://" not in origin:
                origin = self._from_host(origin)
        elif self.dynamic and ns:
            origin = self._from_host(ns.strip())
        else:
            origin = self.default_origin
        return self.check_allowed(origin)

    def check_allowed(self, origin: str) -> str:
        """``scheme://netloc`` of ``origin`` when it is on the allow-list; Forbidden otherwise."""
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Forbidden(f"not a registry URL: {origin!r}")
        if normalise_origin(origin) not in self.allowed:
            raise Forbidden(f"registry {origin} is not on this mirror's allow-list", registry=origin)
        return f"{parts.scheme}://{parts.netloc}"

    def _from_host(self, host: str) -> str:
        """A bare host (as in ``ns=``) matched against the allow-list to learn its scheme."""
        host = _HOST_ALIASES.get(host.lower(), host.lower())
        for url in self.allowed_urls:
            parts = urlsplit(url)
            if parts.netloc.lower() == host or (parts.hostname or "").lower() == host:
                return f"{parts.scheme}://{parts.netloc}"
        return f"https://{host}"

    def goes_p2p(self, path_and_query: str) -> bool:
        """Whether a URL is served through P2P (Dragonfly's ``proxies`` rules; ``direct`` wins)."""
        if any(rule.search(path_and_query) for rule in self.direct_rules):
            return False
        return any(rule.search(path_and_query) for rule in self.p2p_rules)
