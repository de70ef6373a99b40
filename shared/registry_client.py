"""HTTP to origin registries (OCI distribution v2), as the proxy and the seed need it.

* The client's ``Authorization`` is forwarded as it is (basic auth, or a bearer token the client got).
* A ``401`` with ``WWW-Authenticate: Bearer realm=…`` is answered by the token flow when we hold basic
  credentials or none (anonymous pulls from Docker Hub work that way); tokens are cached until expiry.
* Transient failures (5xx, 429, timeouts, refused connections) are retried with exponential backoff;
  ``Retry-After`` is honoured.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

import aiohttp

from shared.errors import DependencyUnavailable, Forbidden, NotFound, Unauthorized, UpstreamError

logger = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class BearerChallenge:
    """A registry's ``WWW-Authenticate: Bearer`` challenge."""

    realm: str
    service: str | None
    scope: str | None

    @classmethod
    def parse(cls, header: str | None) -> BearerChallenge | None:
        """The challenge in ``header``, if it is a bearer one."""
        if not header or not header.lower().startswith("bearer "):
            return None
        params = dict(_CHALLENGE_PARAM.findall(header))
        if "realm" not in params:
            return None
        return cls(realm=params["realm"], service=params.get("service"), scope=params.get("scope"))


def _retry_after(response: aiohttp.ClientResponse, default: float) -> float:
    value = response.headers.get("Retry-After", "")
    return min(float(value), 30.0) if value.isdigit() else default


class OriginClient:
    """Requests to origin registries with auth handling and retries."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        max_attempts: int = 5,
        base_delay: float = 0.2,
        insecure: bool = False,
    ) -> None:
        self.session = session
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        # aiohttp takes False to skip verification, True for the default context.
        self.ssl: ssl.SSLContext | bool = not insecure
        self._tokens: dict[tuple[str, str | None, str | None, str | None], tuple[str, float]] = {}

    async def _token(self, challenge: BearerChallenge, authorization: str | None) -> str:
        key = (challenge.realm, challenge.service, challenge.scope, authorization)
        cached = self._tokens.get(key)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        query = {name: value for name, value in (("service", challenge.service), ("scope", challenge.scope)) if value}
        url = challenge.realm + ("?" + urlencode(query) if query else "")
        headers = {"Authorization": authorization} if authorization else {}
        try:
            async with self.session.get(url, headers=headers, ssl=self.ssl) as response:
                if response.status in (401, 403):
                    raise Unauthorized(f"the registry's token service refused the credentials ({response.status})")
                if response.status != 200:
                    raise UpstreamError(f"token service {challenge.realm} answered {response.status}")
                body = await response.json(content_type=None)
        except aiohttp.ClientError as exc:
            raise DependencyUnavailable(f"token service {challenge.realm} unreachable: {exc}") from exc
        token = body.get("token") or body.get("access_token")
        if not isinstance(token, str):
            raise UpstreamError("token service answered without a token")
        expires_in = float(body.get("expires_in") or 60)
        self._tokens[key] = (token, time.monotonic() + max(expires_in - 10, 5))
        return token

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        authorization: str | None = None,
        timeout: float = 60.0,
        allow_redirects: bool = True,
    ) -> aiohttp.ClientResponse:
        """Send a request, answering bearer challenges and retrying transient failures.

        Returns the response (the caller reads and releases it): any final status, 2xx or not, except
        that exhausted retries raise DependencyUnavailable.
        """
        request_headers = dict(headers or {})
        bearer: str | None = None
        delay = self.base_delay
        last_error = "no attempt"
        for attempt in range(1, self.max_attempts + 1):
            sent_auth = f"Bearer {bearer}" if bearer else authorization
            if sent_auth:
                request_headers["Authorization"] = sent_auth
            try:
                response = await self.session.request(
                    method,
                    url,
                    headers=request_headers,
                    ssl=self.ssl,
                    allow_redirects=allow_redirects,
                    timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=10),
                )
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            else:
                if response.status == 401 and bearer is None:
                    challenge = BearerChallenge.parse(response.headers.get("WWW-Authenticate"))
                    basic_or_none = authorization is None or authorization.lower().startswith("basic ")
                    if challenge is not None and basic_or_none:
                        response.release()
                        bearer = await self._token(challenge, authorization)
                        continue
                if response.status not in RETRYABLE_STATUSES:
                    return response
                last_error = f"HTTP {response.status}"
                delay = _retry_after(response, delay)
                response.release()
            if attempt < self.max_attempts:
                logger.info("origin %s %s failed (%s); retry %d in %.2fs", method, url, last_error, attempt, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        raise DependencyUnavailable(f"origin {url} failed after {self.max_attempts} attempts: {last_error}")

    async def fetch_range(self, url: str, start: int, end_inclusive: int, authorization: str | None) -> bytes:
        """The bytes ``start..end_inclusive`` of ``url`` (retried as a whole on short or failed reads)."""
        expected = end_inclusive - start + 1
        for attempt in range(1, self.max_attempts + 1):
            response = await self.request(
                "GET", url, headers={"Range": f"bytes={start}-{end_inclusive}"}, authorization=authorization
            )
            try:
                raise_for_origin_status(response, url)
                try:
                    data = await response.read()
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
                    data = b""
                    logger.info("reading %s bytes %d-%d failed: %s", url, start, end_inclusive, exc)
            finally:
                response.release()
            if response.status == 206 and len(data) == expected:
                return data
            if response.status == 200 and len(data) >= end_inclusive + 1:
                # An origin that ignores Range sends the whole blob: take our slice of it.
                return data[start : end_inclusive + 1]
            if attempt < self.max_attempts:
                await asyncio.sleep(min(self.base_delay * 2**attempt, 5.0))
        raise DependencyUnavailable(f"origin {url} kept returning short reads for bytes {start}-{end_inclusive}")

    async def range_parts(
        self, url: str, start: int, lengths: Sequence[int], authorization: str | None
    ) -> AsyncIterator[bytes]:
        """Consecutive parts of one range request (``lengths`` bytes each, from ``start``), each yielded as soon
        as its bytes have arrived, so a caller can use the first part while the rest are on the wire.

        One attempt (the request itself is retried like any other): an origin that ignores Range, a failed
        status or a short read raises :class:`UpstreamError` or :class:`DependencyUnavailable` after the parts
        already yielded, and the caller fetches what is left another way.
        """
        end_inclusive = start + sum(lengths) - 1
        response = await self.request(
            "GET", url, headers={"Range": f"bytes={start}-{end_inclusive}"}, authorization=authorization
        )
        try:
            raise_for_origin_status(response, url)
            if response.status != 206:
                raise UpstreamError(f"origin {url} answered a range request with {response.status}, not 206")
            for length in lengths:
                try:
                    part = await response.content.readexactly(length)
                except (
                    asyncio.IncompleteReadError,
                    aiohttp.ClientPayloadError,
                    aiohttp.ClientConnectionError,
                    TimeoutError,
                ) as exc:
                    raise DependencyUnavailable(f"origin {url} cut bytes {start}-{end_inclusive} short: {exc}") from exc
                yield part
        finally:
            response.release()

    async def content_length(self, url: str, authorization: str | None) -> int:
        """The size of the resource at ``url`` (HEAD, or a one-byte range when HEAD has no length)."""
        response = await self.request("HEAD", url, authorization=authorization)
        try:
            raise_for_origin_status(response, url)
            length = response.headers.get("Content-Length")
        finally:
            response.release()
        if length is not None and length.isdigit():
            return int(length)
        response = await self.request("GET", url, headers={"Range": "bytes=0-0"}, authorization=authorization)
        try:
            raise_for_origin_status(response, url)
            content_range = response.headers.get("Content-Range", "")
        finally:
            response.release()
        total = content_range.rsplit("/", 1)[-1]
        if not total.isdigit():
            raise UpstreamError(f"origin {url} tells no size (Content-Range {content_range!r})")
        return int(total)


def normalise_origin(url: str) -> str:
    """``scheme://host:port`` of ``url`` in lower case, the port made explicit (for allow-lists)."""
    parts = urlsplit(url if "://" in url else f"https://{url}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


def raise_for_origin_status(response: aiohttp.ClientResponse, url: str) -> None:
    """Turn a final non-success status of the origin into the project's error classes."""
    if response.status < 400:
        return
    if response.status == 401:
        raise Unauthorized(f"origin {url} requires authentication")
    if response.status == 403:
        raise Forbidden(f"origin {url} refused access")
    if response.status == 404:
        raise NotFound(f"origin has no {url}")
    raise UpstreamError(f"origin {url} answered {response.status}", status=response.status)
