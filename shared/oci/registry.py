"""OCI distribution pull and push against a registry, on top of the origin client's auth and retry rules.

Pull: ``GET /v2/<name>/manifests/<ref>`` with an Accept for OCI and Docker v2 manifests and indexes, then
``GET /v2/<name>/blobs/<digest>`` streamed to disk while its sha256 is computed.

Push (distribution spec "pushing blobs"): ``HEAD`` the blob and skip it if present; else ``POST
/v2/<name>/blobs/uploads/``, then one ``PUT <location>?digest=`` with the bytes (monolithic) or, for big
blobs, ``PATCH`` chunks with ``Content-Range`` and a final empty ``PUT ?digest=``; then ``PUT`` the manifest
with its media type as ``Content-Type``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
from yarl import URL

from shared.errors import (
    BlobDigestMismatch,
    DamselflyError,
    DependencyUnavailable,
    Forbidden,
    InvalidRequest,
    MalformedMessage,
    NotFound,
    Unauthorized,
    UpstreamError,
)
from shared.registry_client import RETRYABLE_STATUSES, BearerChallenge, OriginClient

from .auth import Credentials
from .manifest import MAX_MANIFEST_SIZE, Descriptor, Platform, sha256_digest
from .mediatypes import MANIFEST_ACCEPT
from .progress import ProgressTask
from .reference import DEFAULT_TAG, RegistryRef
from .store import ResolvedImage, resolve_image

logger = logging.getLogger(__name__)

#: Blobs up to this size go up in one PUT; bigger ones in PATCH chunks of this size, so a failure
#: costs one chunk of bandwidth rather than the whole blob and no single request body is huge.
UPLOAD_CHUNK_SIZE = 16 << 20
_READ_SIZE = 1 << 20
#: Whole-blob attempts (a failed upload session or a broken download starts over).
BLOB_ATTEMPTS = 3

# sha256 of no bytes: a blob name that is valid everywhere and harmless to ask about.
_EMPTY_DIGEST = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

Body = Callable[[], bytes | AsyncIterator[bytes]]


def _registry_errors(text: str) -> str:
    """The messages of a distribution error body (``{"errors": [{"code", "message"}]}``), else the text."""
    try:
        doc = json.loads(text)
        parts = [f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in doc.get("errors", [])]
        return "; ".join(p for p in parts if p) or text[:200]
    except (ValueError, AttributeError):
        return text[:200].strip()


class RegistryClient(OriginClient):
    """Requests to one registry host: scheme discovery, credentials, per-repository bearer tokens.

    The base class answers bearer challenges one request at a time; a push must not send a 16 MiB body
    just to be told to get a token, so tokens are kept per scope (``repository:NAME:pull`` or
    ``...:pull,push``) and sent up front.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        host: str,
        *,
        insecure: bool = False,
        credentials: Credentials | None = None,
        max_attempts: int = 4,
        base_delay: float = 0.2,
    ) -> None:
        super().__init__(session, max_attempts=max_attempts, base_delay=base_delay, insecure=insecure)
        self.host = host
        self.insecure = insecure
        self.credentials = credentials
        self._basic = credentials.header if credentials else None
        self._scheme: str | None = None
        self._scheme_lock = asyncio.Lock()
        self._bearer: dict[str, str] = {}
        self._token_locks: dict[str, asyncio.Lock] = {}

    async def base_url(self) -> str:
        """``scheme://host``: https, or for an insecure registry whichever of https/http answers."""
        async with self._scheme_lock:
            if self._scheme is None:
                self._scheme = await self._probe_scheme()
        return f"{self._scheme}://{self.host}"

    async def _probe_scheme(self) -> str:
        if not self.insecure:
            return "https"
        # Like docker's insecure-registries: TLS without verification if the registry speaks it, else
        # plain HTTP.  One quick try without retries, so a plain-HTTP registry costs one failed handshake.
        try:
            async with self.session.get(
                f"https://{self.host}/v2/", ssl=False, timeout=aiohttp.ClientTimeout(total=10, sock_connect=5)
            ):
                return "https"
        except (aiohttp.ClientError, TimeoutError):
            return "http"

    async def call(
        self,
        method: str,
        url: str,
        *,
        scope: str,
        headers: dict[str, str] | None = None,
        body: Body | None = None,
        retry: bool = True,
        timeout: float | None = 120.0,
    ) -> aiohttp.ClientResponse:
        """Send a request with this scope's token (or basic credentials), answering one bearer challenge.

        ``body`` is a factory so a retried request sends fresh bytes.  Bodies are normally sent with
        ``retry=False``: re-sending a PATCH that may have landed would corrupt the upload, so the caller
        restarts the whole upload instead.  Returns the response for any final status.
        """
        request_headers = dict(headers or {})
        attempts = self.max_attempts if retry else 1
        delay = self.base_delay
        challenged = False
        attempt = 0
        last_error = "no attempt"
        while attempt < attempts:
            attempt += 1
            token = self._bearer.get(scope)
            auth = f"Bearer {token}" if token else self._basic
            if auth:
                request_headers["Authorization"] = auth
            try:
                response = await self.session.request(
                    method,
                    url,
                    headers=request_headers,
                    data=body() if body is not None else None,
                    ssl=self.ssl,
                    timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=10, sock_read=120),
                )
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            else:
                if response.status == 401 and not challenged:
                    challenge = BearerChallenge.parse(response.headers.get("WWW-Authenticate"))
                    if challenge is not None:
                        # A new or expired token: fetch one for this scope and repeat (not counted as a retry).
                        response.release()
                        challenged = True
                        await self._refresh_token(challenge, scope, token)
                        attempt -= 1
                        continue
                if response.status not in RETRYABLE_STATUSES or attempt >= attempts:
                    return response
                last_error = f"HTTP {response.status}"
                retry_after = response.headers.get("Retry-After", "")
                delay = min(float(retry_after), 30.0) if retry_after.isdigit() else delay
                response.release()
            if attempt < attempts:
                logger.info("registry %s %s failed (%s); retry %d in %.2fs", method, url, last_error, attempt, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        raise DependencyUnavailable(
            f"registry {self.host} unreachable ({method} {URL(url).path}): {last_error}", registry=self.host
        )

    async def _refresh_token(self, challenge: BearerChallenge, scope: str, stale: str | None) -> None:
        # Ask for the scope we will need, not the one in the challenge: a HEAD is challenged for "pull"
        # only, and a push token taken then saves a second challenge (and a wasted body) on the upload.
        # One fetch per scope at a time: parallel uploads challenged together share the new token.
        async with self._token_locks.setdefault(scope, asyncio.Lock()):
            if self._bearer.get(scope) != stale:
                return
            wanted = BearerChallenge(challenge.realm, challenge.service, scope)
            self._bearer[scope] = await self._token(wanted, self._basic)

    async def check(self, response: aiohttp.ClientResponse, what: str) -> None:
        """Raise the project's error for a non-success status, with the registry's own message."""
        if response.status < 400:
            return
        detail = _registry_errors(await response.text(errors="replace"))
        detail = f": {detail}" if detail else ""
        if response.status == 401:
            given = "the credentials were refused" if self.credentials else "no credentials were given"
            raise Unauthorized(f"registry {self.host} requires authentication for {what} ({given})")
        if response.status == 403:
            raise Forbidden(f"registry {self.host} denied {what}{detail}")
        if response.status == 404:
            raise NotFound(f"registry {self.host} has no {what}{detail}")
        raise UpstreamError(f"registry {self.host} answered {response.status} for {what}{detail}")


def _file_body(path: Path, offset: int, length: int, progress: ProgressTask) -> Body:
    """A body factory streaming ``length`` bytes of ``path`` from ``offset``, advancing ``progress``."""

    async def stream() -> AsyncIterator[bytes]:
        with path.open("rb") as f:
            f.seek(offset)
            left = length
            while left > 0:
                block = f.read(min(_READ_SIZE, left))
                if not block:
                    raise DependencyUnavailable(f"{path} shrank while being uploaded")
                left -= len(block)
                progress.advance(len(block))
                yield block

    return stream


class RegistryStore:
    """One repository in a registry, as a source or a target of images."""

    def __init__(self, client: RegistryClient, ref: RegistryRef) -> None:
        self.client = client
        self.ref = ref
        self.name = str(ref)
        self._pull = f"repository:{ref.repository}:pull"
        self._push = f"repository:{ref.repository}:pull,push"

    async def _url(self, kind: str, reference: str) -> str:
        return f"{await self.client.base_url()}/v2/{self.ref.repository}/{kind}/{reference}"

    # -- pull --------------------------------------------------------------------------------------

    async def _get_manifest(self, reference: str) -> tuple[bytes, str | None]:
        url = await self._url("manifests", reference)
        response = await self.client.call("GET", url, scope=self._pull, headers={"Accept": MANIFEST_ACCEPT})
        try:
            await self.client.check(response, f"manifest {self.ref.repository}:{reference}")
            length = response.content_length or 0
            if length > MAX_MANIFEST_SIZE:
                raise MalformedMessage(f"{self.name}: manifest of {length} bytes is over the limit")
            raw = await response.content.read(MAX_MANIFEST_SIZE + 1)
            return raw, response.headers.get("Content-Type")
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise DependencyUnavailable(f"registry {self.client.host}: reading a manifest failed: {exc}") from exc
        finally:
            response.release()

    async def resolve(self, platform: Platform) -> ResolvedImage:
        """The manifest for ``platform`` (through a manifest list / index) and its config."""

        async def fetch(desc: Descriptor | None) -> tuple[bytes, str | None]:
            return await self._get_manifest(self.ref.reference if desc is None else desc.digest)

        async def read_small(desc: Descriptor) -> bytes:
            url = await self._url("blobs", desc.digest)
            response = await self.client.call("GET", url, scope=self._pull)
            try:
                await self.client.check(response, f"blob {desc.digest} of {self.ref.repository}")
                return await response.content.read(desc.size + 1)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                raise DependencyUnavailable(f"registry {self.client.host}: reading a blob failed: {exc}") from exc
            finally:
                response.release()

        return await resolve_image(self.name, fetch, read_small, platform, pinned=self.ref.digest)

    async def fetch_blob(
        self, desc: Descriptor, directory: Path, progress: ProgressTask, *, verify: bool = True
    ) -> Path:
        """Download the blob into ``directory``, verifying size and sha256 as it streams (always)."""
        dest = directory / desc.digest.replace(":", "-")
        tmp = dest.with_name(dest.name + ".partial")
        url = await self._url("blobs", desc.digest)
        for attempt in range(1, BLOB_ATTEMPTS + 1):
            progress.reset()
            try:
                actual, size = await self._download(url, desc, tmp, progress)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
                tmp.unlink(missing_ok=True)
                if attempt == BLOB_ATTEMPTS:
                    raise DependencyUnavailable(
                        f"registry {self.client.host}: download of {desc.digest} kept failing: {exc}"
                    ) from exc
                await asyncio.sleep(self.client.base_delay * 2**attempt)
                continue
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            if size != desc.size or actual != desc.digest:
                tmp.unlink(missing_ok=True)
                got = actual if size == desc.size else f"{size} bytes instead of {desc.size}"
                raise BlobDigestMismatch(desc.digest, got, what=f"{self.name}: blob")
            tmp.replace(dest)
            return dest
        raise AssertionError("unreachable")  # pragma: no cover

    async def _download(self, url: str, desc: Descriptor, tmp: Path, progress: ProgressTask) -> tuple[str, int]:
        response = await self.client.call("GET", url, scope=self._pull, timeout=None)
        try:
            await self.client.check(response, f"blob {desc.digest} of {self.ref.repository}")
            h = hashlib.sha256()
            size = 0
            with tmp.open("wb") as sink:
                async for block in response.content.iter_chunked(_READ_SIZE):
                    size += len(block)
                    if size > desc.size:
                        # Stop early: a registry (or a man in the middle) sending more than announced.
                        return "sha256:?", size
                    h.update(block)
                    sink.write(block)
                    progress.advance(len(block))
            return "sha256:" + h.hexdigest(), size
        finally:
            response.release()

    # -- push --------------------------------------------------------------------------------------

    async def check_writable(self) -> None:
        """Ask for a blob with push rights: a 404 proves the credentials will do, a 401/403 fails early."""
        if self.ref.digest:
            raise InvalidRequest(f"target {self.name} must name a tag, not a digest")
        response = await self.client.call("HEAD", await self._url("blobs", _EMPTY_DIGEST), scope=self._push)
        try:
            if response.status in (401, 403):
                await self.client.check(response, f"pushes to {self.ref.repository}")
        finally:
            response.release()

    async def push_blob(self, desc: Descriptor, path: Path, progress: ProgressTask) -> bool:
        """Upload the blob unless the repository has it; True if bytes were sent."""
        url = await self._url("blobs", desc.digest)
        response = await self.client.call("HEAD", url, scope=self._push)
        try:
            length = response.headers.get("Content-Length")
            if response.status == 200 and length == str(desc.size):
                progress.advance(desc.size)
                return False
            if response.status not in (200, 404):
                await self.client.check(response, f"blob {desc.digest} in {self.ref.repository}")
        finally:
            response.release()
        for attempt in range(1, BLOB_ATTEMPTS + 1):
            progress.reset()
            try:
                await self._upload(desc, path, progress)
                return True
            except (DependencyUnavailable, UpstreamError, aiohttp.ClientError, TimeoutError) as exc:
                if attempt == BLOB_ATTEMPTS:
                    if isinstance(exc, DamselflyError):
                        raise
                    raise DependencyUnavailable(f"registry {self.client.host}: upload failed: {exc}") from exc
                logger.info("upload of %s failed (%s); starting over", desc.digest, exc)
                await asyncio.sleep(self.client.base_delay * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _upload(self, desc: Descriptor, path: Path, progress: ProgressTask) -> None:
        base = await self.client.base_url()
        what = f"upload of {desc.digest} to {self.ref.repository}"
        response = await self.client.call(
            "POST", await self._url("blobs", "uploads/"), scope=self._push, headers={"Content-Length": "0"}
        )
        try:
            await self.client.check(response, what)
            location = self._location(response, base, what)
        finally:
            response.release()
        if desc.size <= UPLOAD_CHUNK_SIZE:
            final_body: Body | None = _file_body(path, 0, desc.size, progress)
            final_length = desc.size
        else:
            offset = 0
            while offset < desc.size:
                length = min(UPLOAD_CHUNK_SIZE, desc.size - offset)
                response = await self.client.call(
                    "PATCH",
                    location,
                    scope=self._push,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Length": str(length),
                        # distribution's chunk range is "start-end" inclusive, without a unit.
                        "Content-Range": f"{offset}-{offset + length - 1}",
                    },
                    body=_file_body(path, offset, length, progress),
                    retry=False,
                    timeout=None,
                )
                try:
                    await self.client.check(response, what)
                    location = self._location(response, base, what)
                finally:
                    response.release()
                offset += length
            final_body, final_length = None, 0
        put_url = str(URL(location).update_query(digest=desc.digest))
        response = await self.client.call(
            "PUT",
            put_url,
            scope=self._push,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(final_length)},
            body=final_body,
            retry=False,
            timeout=None,
        )
        try:
            await self.client.check(response, what)
            if response.status != 201:
                raise UpstreamError(f"registry {self.client.host} answered {response.status} to the end of {what}")
            stored = response.headers.get("Docker-Content-Digest")
            if stored and stored != desc.digest:
                raise BlobDigestMismatch(desc.digest, stored, what=f"{self.name}: uploaded blob")
        finally:
            response.release()

    @staticmethod
    def _location(response: aiohttp.ClientResponse, base: str, what: str) -> str:
        location = response.headers.get("Location")
        if not location:
            raise UpstreamError(f"registry answered the {what} without a Location")
        # Location may be relative (distribution's default) or absolute (behind a proxy).
        return str(URL(base).join(URL(location)))

    async def push_manifest(self, raw: bytes, media_type: str) -> str:
        """PUT the manifest under the reference's tag; returns its digest."""
        if self.ref.digest:
            raise InvalidRequest(f"target {self.name} must name a tag, not a digest")
        digest = sha256_digest(raw)
        tag = self.ref.tag or DEFAULT_TAG
        response = await self.client.call(
            "PUT",
            await self._url("manifests", tag),
            scope=self._push,
            headers={"Content-Type": media_type},
            body=lambda: raw,
        )
        try:
            await self.client.check(response, f"manifest {self.ref.repository}:{tag}")
            stored = response.headers.get("Docker-Content-Digest")
            if stored and stored != digest:
                raise BlobDigestMismatch(digest, stored, what=f"{self.name}: pushed manifest")
        finally:
            response.release()
        return digest
