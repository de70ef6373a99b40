"""The registry backend of a lazy mount: blob ranges through the node's mirror, or straight from the origin.

Like nydusd's registry backend with mirrors: every request goes to the first healthy mirror with its headers
(``X-Dragonfly-Registry`` naming the origin, so the registry-proxy knows where to go back to source).  A
mirror that refuses the connection, times out or answers 5xx is marked unhealthy and the request is sent
to the origin at once; a background task pings every mirror's ``ping_url`` and marks it healthy again as
soon as it answers, so traffic returns to the mirror by itself.  The origin is retried ``retry_limit``
times with backoff; a bearer challenge (Docker Hub, Harbor) is answered with a token from the registry's
token service, with the credentials of the docker config when there are any.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp

from services.chunk_fuse.mount_config import BackendConfig, MirrorConfig
from shared.errors import DependencyUnavailable, Forbidden, NotFound, Unauthorized, UpstreamError
from shared.oci.auth import resolve_credentials
from shared.oci.mediatypes import MANIFEST_ACCEPT
from shared.oci.reference import DOCKER_HUB, RegistryRef
from shared.registry_client import RETRYABLE_STATUSES, BearerChallenge, OriginClient

logger = logging.getLogger(__name__)

REGISTRY_HEADER = "X-Dragonfly-Registry"
USER_AGENT = "damselfly-chunk-fuse/0.1"
#: Largest manifest or config we read whole (registries refuse manifests over 4 MiB).
MAX_SMALL_BLOB = 16 << 20


@dataclass
class BackendStats:
    """Counters of what went over the network (thread-safe increments)."""

    bytes_fetched: int = 0
    requests: int = 0
    mirror_requests: int = 0
    origin_requests: int = 0
    mirror_failovers: int = 0
    failed_requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, *, bytes_fetched: int = 0, via_mirror: bool | None = None, failed: bool = False) -> None:
        """Count one request (or one failover, with ``via_mirror=None``)."""
        with self._lock:
            self.bytes_fetched += bytes_fetched
            if via_mirror is not None:
                self.requests += 1
                if via_mirror:
                    self.mirror_requests += 1
                else:
                    self.origin_requests += 1
            if failed:
                self.failed_requests += 1

    def failover(self) -> None:
        """Count a request the mirror could not serve and the origin got instead."""
        with self._lock:
            self.mirror_failovers += 1

    def snapshot(self) -> dict[str, int]:
        """The counters as a dict."""
        with self._lock:
            return {
                "bytes_fetched": self.bytes_fetched,
                "requests": self.requests,
                "mirror_requests": self.mirror_requests,
                "origin_requests": self.origin_requests,
                "mirror_failovers": self.mirror_failovers,
                "failed_requests": self.failed_requests,
            }


class _Failover(Exception):
    """The mirror cannot serve this request; the origin should."""

    def __init__(self, reason: str, *, unhealthy: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unhealthy = unhealthy


class _Retryable(Exception):
    """A transient origin failure worth another attempt."""


@dataclass
class MirrorState:
    """A mirror and whether requests go to it right now."""

    config: MirrorConfig
    headers: dict[str, str]
    healthy: bool = True
    changed_at: float = field(default_factory=time.monotonic)

    def set_healthy(self, healthy: bool, reason: str) -> None:
        """Record a health change (logged once per change)."""
        if healthy != self.healthy:
            self.healthy = healthy
            self.changed_at = time.monotonic()
            logger.warning("mirror %s is %s (%s)", self.config.host, "healthy" if healthy else "unhealthy", reason)


class _TokenClient(OriginClient):
    """The origin client's bearer-token cache, used for challenges from the origin or the mirror."""

    async def token(self, challenge: BearerChallenge, authorization: str | None) -> str:
        """A token for ``challenge`` (cached until it expires)."""
        return await self._token(challenge, authorization)


def origin_header_value(ref: RegistryRef, scheme: str) -> str:
    """What ``X-Dragonfly-Registry`` says for this image's registry (Docker Hub by its usual name)."""
    if ref.host == DOCKER_HUB:
        return "https://index.docker.io"
    return f"{scheme}://{ref.api_host}"


class RegistryBackend:
    """Manifests, small blobs and blob ranges of one repository; lives on one asyncio loop."""

    def __init__(self, config: BackendConfig, ref: RegistryRef, stats: BackendStats | None = None) -> None:
        self.config = config
        self.ref = ref
        self.stats = stats or BackendStats()
        self.mirrors: list[MirrorState] = []
        self._origin: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tokens: _TokenClient | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._bearer: str | None = None
        self._authorization: str | None = None
        self._ssl: bool = not (config.skip_verify or config.insecure)

    # -- lifecycle ----------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the HTTP session, settle the origin's scheme, and start watching the mirrors."""
        timeout = aiohttp.ClientTimeout(total=self.config.timeout, sock_connect=self.config.connect_timeout)
        connector = aiohttp.TCPConnector(limit=64, ssl=self._ssl)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector, headers={"User-Agent": USER_AGENT})
        self._tokens = _TokenClient(self._session, insecure=not self._ssl)
        if self.config.auth:
            self._authorization = f"Basic {self.config.auth}"
        else:
            credentials = resolve_credentials(self.ref.api_host, None)
            self._authorization = credentials.header if credentials else None
        self._origin = f"{await self._scheme()}://{self.ref.api_host}"
        origin_value = origin_header_value(self.ref, self._origin.split("://")[0])
        for mirror in self.config.mirrors:
            headers = dict(mirror.headers)
            # The seed config names its origin explicitly; otherwise the proxy must learn it from us.
            if not any(key.lower() == REGISTRY_HEADER.lower() for key in headers):
                headers[REGISTRY_HEADER] = origin_value
            self.mirrors.append(MirrorState(mirror, headers))
        if self.mirrors:
            self._health_task = asyncio.create_task(self._watch_mirrors(), name="mirror-health")

    async def close(self) -> None:
        """Stop the health checks and close the session."""
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self._session is not None:
            await self._session.close()

    @property
    def origin(self) -> str:
        """``scheme://host`` of the origin registry."""
        if self._origin is None:
            raise RuntimeError("backend is not open")
        return self._origin

    @property
    def session(self) -> aiohttp.ClientSession:
        """The HTTP session."""
        if self._session is None:
            raise RuntimeError("backend is not open")
        return self._session

    async def _scheme(self) -> str:
        if self.config.scheme and not self.config.insecure:
            return self.config.scheme
        if not self.config.insecure:
            return "https"
        # Docker's insecure-registries rule: TLS without verification if the registry speaks it, else HTTP.
        try:
            async with self.session.get(
                f"https://{self.ref.api_host}/v2/",
                ssl=False,
                timeout=aiohttp.ClientTimeout(total=5, sock_connect=min(self.config.connect_timeout, 5)),
            ):
                return "https"
        except (aiohttp.ClientError, TimeoutError):
            return "http"

    async def _watch_mirrors(self) -> None:
        interval = min(m.config.health_check_interval for m in self.mirrors)
        while True:
            await asyncio.sleep(interval)
            await asyncio.gather(*(self.ping(m) for m in self.mirrors))

    async def ping(self, mirror: MirrorState) -> bool:
        """Check one mirror's ping URL now and record the answer."""
        url = mirror.config.effective_ping_url
        try:
            async with self.session.get(
                url, timeout=aiohttp.ClientTimeout(total=min(self.config.timeout, 3), sock_connect=2)
            ) as response:
                ok = response.status < 500
                reason = f"ping {url} answered {response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok, reason = False, f"ping {url} failed: {type(exc).__name__}"
        mirror.set_healthy(ok, reason)
        return ok

    # -- requests -----------------------------------------------------------------------------------

    async def get_manifest(self, reference: str) -> tuple[bytes, str | None]:
        """A manifest or index by tag or digest, with its Content-Type."""
        path = f"/v2/{self.ref.repository}/manifests/{reference}"
        body, headers = await self._get(path, {"Accept": MANIFEST_ACCEPT}, what=f"manifest {reference}")
        return body, headers.get("Content-Type")

    async def get_blob(self, digest: str, size: int) -> bytes:
        """A whole (small) blob: the config or a bootstrap."""
        if size > MAX_SMALL_BLOB * 8:
            raise UpstreamError(f"blob {digest} is {size} bytes, too big to read whole")
        body, _ = await self._get(f"/v2/{self.ref.repository}/blobs/{digest}", {}, what=f"blob {digest}")
        return body

    async def get_range(self, digest: str, offset: int, length: int) -> bytes:
        """``length`` bytes of a blob from ``offset`` (one HTTP Range request)."""
        end = offset + length - 1
        body, _ = await self._get(
            f"/v2/{self.ref.repository}/blobs/{digest}",
            {"Range": f"bytes={offset}-{end}"},
            what=f"blob {digest} bytes {offset}-{end}",
            expect=length,
            offset=offset,
        )
        return body

    async def _get(
        self,
        path: str,
        headers: Mapping[str, str],
        *,
        what: str,
        expect: int | None = None,
        offset: int = 0,
    ) -> tuple[bytes, Mapping[str, str]]:
        for mirror in self.mirrors:
            if not mirror.healthy:
                continue
            try:
                return await self._attempt(
                    mirror.config.host + path, {**mirror.headers, **headers}, what, expect, offset, via_mirror=True
                )
            except _Failover as exc:
                self.stats.failover()
                if exc.unhealthy:
                    mirror.set_healthy(False, exc.reason)
                logger.info("mirror %s could not serve %s (%s); going to the origin", mirror.config.host, what, exc)
        delay = 0.2
        last = "no attempt"
        for attempt in range(self.config.retry_limit + 1):
            try:
                return await self._attempt(self.origin + path, dict(headers), what, expect, offset, via_mirror=False)
            except _Retryable as exc:
                last = str(exc)
                if attempt < self.config.retry_limit:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        raise DependencyUnavailable(f"registry {self.ref.api_host}: {what} failed: {last}", registry=self.ref.api_host)

    async def _attempt(
        self,
        url: str,
        headers: dict[str, str],
        what: str,
        expect: int | None,
        offset: int,
        *,
        via_mirror: bool,
    ) -> tuple[bytes, Mapping[str, str]]:
        """One request (plus one answered bearer challenge); failures raise _Failover or _Retryable."""
        challenged = False
        while True:
            auth = f"Bearer {self._bearer}" if self._bearer else self._authorization
            if auth:
                headers["Authorization"] = auth
            try:
                async with self.session.get(url, headers=headers) as response:
                    status = response.status
                    if status == 401 and not challenged:
                        challenge = BearerChallenge.parse(response.headers.get("WWW-Authenticate"))
                        if challenge is not None and self._tokens is not None:
                            challenged = True
                            self._bearer = await self._tokens.token(challenge, self._authorization)
                            continue
                    if status in (200, 206):
                        body = await response.read()
                        self.stats.add(bytes_fetched=len(body), via_mirror=via_mirror)
                        return self._check_body(body, status, expect, offset, what, via_mirror), response.headers
                    detail = (await response.text(errors="replace"))[:200]
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.stats.add(via_mirror=via_mirror, failed=True)
                reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
                if via_mirror:
                    raise _Failover(reason, unhealthy=True) from exc
                raise _Retryable(reason) from exc
            self.stats.add(via_mirror=via_mirror, failed=True)
            return self._fail(status, detail, what, via_mirror)

    def _check_body(
        self, body: bytes, status: int, expect: int | None, offset: int, what: str, via_mirror: bool
    ) -> bytes:
        if expect is None:
            return body
        if status == 200 and len(body) >= offset + expect:
            # A server that ignores Range sends the whole blob: keep our slice.
            return body[offset : offset + expect]
        if len(body) != expect:
            reason = f"{what}: got {len(body)} bytes, expected {expect}"
            if via_mirror:
                raise _Failover(reason, unhealthy=False)
            raise _Retryable(reason)
        return body

    def _fail(self, status: int, detail: str, what: str, via_mirror: bool) -> tuple[bytes, Mapping[str, str]]:
        reason = f"HTTP {status} for {what}"
        if via_mirror:
            # 5xx means the mirror (or its way to the origin) is broken; a 4xx may be the mirror's own policy
            # (an origin off its allow-list): either way the origin may still answer.
            raise _Failover(reason, unhealthy=status >= 500)
        if status in RETRYABLE_STATUSES:
            raise _Retryable(reason)
        if status == 401:
            raise Unauthorized(f"registry {self.ref.api_host} requires authentication for {what}")
        if status == 403:
            raise Forbidden(f"registry {self.ref.api_host} denied {what}")
        if status == 404:
            raise NotFound(f"registry {self.ref.api_host} has no {what}")
        raise UpstreamError(f"registry {self.ref.api_host} answered {status} for {what}: {detail}")


def basic_auth(user: str, password: str) -> str:
    """nydusd's ``auth`` value: base64 of ``USER:PASS``."""
    return base64.b64encode(f"{user}:{password}".encode()).decode()
