"""The registry-proxy's routes: an OCI Distribution (v2) mirror whose blobs come through P2P."""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

import aiohttp
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from services.registry_proxy.downloader import BlobRequest, PeerDownloader
from services.registry_proxy.metrics import ProxyMetrics, ServedFrom
from services.registry_proxy.origins import REGISTRY_HEADER, ProxyPolicy
from shared.errors import DigestMismatch, InvalidRequest
from shared.registry_client import OriginClient, raise_for_origin_status
from shared.tasks import parse_range_header, task_id_for_digest, task_id_for_url

router = APIRouter(tags=["registry"])

# Clients (docker, containerd, skopeo) check this header to know they speak to a v2 registry.
DISTRIBUTION_HEADERS = {"Docker-Distribution-API-Version": "registry/2.0"}
_PASSED_RESPONSE_HEADERS = ("Content-Type", "Docker-Content-Digest", "WWW-Authenticate", "Etag")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_NAME_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")


@dataclass(frozen=True)
class CachedManifest:
    """A manifest kept by digest (content-addressed, so it never goes stale)."""

    media_type: str
    body: bytes


class ManifestCache:
    """A small LRU of manifests by digest."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, CachedManifest] = OrderedDict()

    def get(self, digest: str) -> CachedManifest | None:
        """The manifest with this digest, if kept."""
        entry = self._entries.get(digest)
        if entry is not None:
            self._entries.move_to_end(digest)
        return entry

    def put(self, digest: str, entry: CachedManifest) -> None:
        """Keep a manifest."""
        if self.capacity <= 0:
            return
        self._entries[digest] = entry
        self._entries.move_to_end(digest)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


class BlobChecks:
    """The origin's recent "yes, and this big" for blobs, by blob and credentials.

    A lazy reader asks for one blob in many ranges; asking the origin each time whether the client may
    read it would put an origin round trip before every range. Only successes are kept, for ``ttl``.
    """

    def __init__(self, ttl: float, capacity: int = 4096) -> None:
        self.ttl = ttl
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, str | None], tuple[float, int | None]] = OrderedDict()

    def get(self, url: str, authorization: str | None) -> tuple[bool, int | None]:
        """Whether a recent check passed, and the size it told."""
        key = (url, authorization)
        entry = self._entries.get(key)
        if entry is None or time.monotonic() - entry[0] > self.ttl:
            self._entries.pop(key, None)
            return False, None
        return True, entry[1]

    def put(self, url: str, authorization: str | None, content_length: int | None) -> None:
        """Remember a passed check."""
        if self.ttl <= 0:
            return
        self._entries[(url, authorization)] = (time.monotonic(), content_length)
        self._entries.move_to_end((url, authorization))
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


@dataclass
class MirrorState:
    """What the routes need, created in the lifespan."""

    policy: ProxyPolicy
    origin: OriginClient
    downloader: PeerDownloader
    manifests: ManifestCache
    prefetch: bool
    metrics: ProxyMetrics
    blob_checks: BlobChecks


def mirror(request: Request) -> MirrorState:
    """The app's mirror state."""
    state: MirrorState = request.app.state.mirror
    return state


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise InvalidRequest(f"invalid repository name {name!r}")


def _origin_of(request: Request, state: MirrorState) -> str:
    return state.policy.origin_for(request.headers.get(REGISTRY_HEADER), request.query_params.get("ns"))


@router.get("/v2/", summary="OCI Distribution API version check.")
async def api_version() -> JSONResponse:
    return JSONResponse({}, headers=DISTRIBUTION_HEADERS)


@router.api_route("/v2/{name:path}/manifests/{reference}", methods=["GET", "HEAD"], summary="A manifest or index.")
async def manifest(name: str, reference: str, request: Request) -> Response:
    state = mirror(request)
    _check_name(name)
    origin = _origin_of(request, state)
    is_digest = bool(_DIGEST_RE.match(reference))
    if is_digest:
        cached = state.manifests.get(reference)
        if cached is not None:
            return _manifest_response(request.method, cached, reference)
    headers = {"Accept": request.headers.get("Accept", "*/*")}
    response = await state.origin.request(
        request.method,
        f"{origin}/v2/{name}/manifests/{reference}",
        headers=headers,
        authorization=request.headers.get("Authorization"),
    )
    try:
        body = await response.read()
        passed = {key: response.headers[key] for key in _PASSED_RESPONSE_HEADERS if key in response.headers}
        if response.status == 200 and request.method == "GET":
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            if is_digest and digest != reference:
                raise DigestMismatch(reference, digest, what=f"manifest {name}@{reference}")
            passed["Docker-Content-Digest"] = digest
            state.manifests.put(digest, CachedManifest(passed.get("Content-Type", ""), body))
        if request.method == "HEAD" and "Content-Length" in response.headers:
            passed["Content-Length"] = response.headers["Content-Length"]
        return Response(
            body if request.method == "GET" else b"",
            status_code=response.status,
            headers={**passed, **DISTRIBUTION_HEADERS},
        )
    finally:
        response.release()


def _manifest_response(method: str, cached: CachedManifest, digest: str) -> Response:
    headers = {"Content-Type": cached.media_type, "Docker-Content-Digest": digest, **DISTRIBUTION_HEADERS}
    if method == "HEAD":
        return Response(b"", headers={**headers, "Content-Length": str(len(cached.body))})
    return Response(cached.body, headers=headers)


@router.api_route("/v2/{name:path}/blobs/{digest}", methods=["GET", "HEAD"], summary="A blob, through P2P.")
async def blob(name: str, digest: str, request: Request) -> Response:
    state = mirror(request)
    _check_name(name)
    if not _DIGEST_RE.match(digest):
        raise InvalidRequest(f"invalid digest {digest!r}")
    origin = _origin_of(request, state)
    url = f"{origin}/v2/{name}/blobs/{digest}"
    authorization = request.headers.get("Authorization")
    path_and_query = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if not state.policy.goes_p2p(path_and_query):
        return await _pass_through(request, state, url)

    task_id = task_id_for_digest(digest)
    stored = await state.downloader.stored_task(task_id)
    content_length: int | None
    checked, checked_length = state.blob_checks.get(url, authorization)
    if stored is not None and stored.completed:
        content_length = stored.content_length
    elif checked:
        content_length = checked_length
    else:
        # Metadata only: it checks the client may read the blob (so cached bytes are no way around the
        # origin's auth), and tells the size, so the seed need not ask again.
        head = await state.origin.request("HEAD", url, authorization=authorization)
        try:
            if head.status in (401, 403, 404):
                passed = {key: head.headers[key] for key in _PASSED_RESPONSE_HEADERS if key in head.headers}
                return Response(b"", status_code=head.status, headers={**passed, **DISTRIBUTION_HEADERS})
            raise_for_origin_status(head, url)
            length_header = head.headers.get("Content-Length", "")
        finally:
            head.release()
        content_length = int(length_header) if length_header.isdigit() else None
        state.blob_checks.put(url, authorization, content_length)

    blob_headers = {"Docker-Content-Digest": digest, "Accept-Ranges": "bytes", **DISTRIBUTION_HEADERS}
    if request.method == "HEAD":
        if content_length is None:
            raise InvalidRequest("the origin did not tell the blob's size")
        return Response(
            b"",
            headers={**blob_headers, "Content-Length": str(content_length), "Content-Type": "application/octet-stream"},
        )

    blob_request = BlobRequest(
        task_id=task_id, url=url, digest=digest, authorization=authorization, content_length=content_length
    )
    range_header = request.headers.get("Range")
    if content_length is not None:
        byte_range = parse_range_header(range_header, content_length)  # 416 before any download starts.
    first, last = byte_range if (content_length is not None and byte_range) else (0, None)
    download, task = await state.downloader.open(blob_request, first, last, prefetch=state.prefetch or not range_header)
    byte_range = parse_range_header(range_header, task.content_length)
    if byte_range is None:
        first, last, status = 0, task.content_length - 1, 200
    else:
        first, last = byte_range
        status = 206
        blob_headers["Content-Range"] = f"bytes {first}-{last}/{task.content_length}"
    blob_headers["Content-Length"] = str(last - first + 1 if task.content_length else 0)
    return StreamingResponse(
        state.downloader.stream(download, task, first, last),
        status_code=status,
        headers=blob_headers,
        media_type="application/octet-stream",
    )


async def _pass_through(request: Request, state: MirrorState, url: str) -> Response:
    """A URL the proxy rules send direct: relay the origin's answer as it streams."""
    headers = {key: request.headers[key] for key in ("Range", "Accept") if key in request.headers}
    response = await state.origin.request(
        request.method, url, headers=headers, authorization=request.headers.get("Authorization")
    )
    passed = {
        key: response.headers[key]
        for key in (*_PASSED_RESPONSE_HEADERS, "Content-Length", "Content-Range")
        if key in response.headers
    }

    served = state.metrics.served_bytes.labels(source=ServedFrom.ORIGIN.value)

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in response.content.iter_chunked(1024 * 1024):
                yield chunk
                served.inc(len(chunk))
        except aiohttp.ClientError:
            return
        finally:
            response.release()

    return StreamingResponse(body(), status_code=response.status, headers={**passed, **DISTRIBUTION_HEADERS})


@router.get("/api/v1/get", summary="Download any allowed HTTP(S) URL through P2P (what `damselfly get` uses).")
async def get_url(url: str, request: Request) -> Response:
    state = mirror(request)
    parts = urlparse_http(url)
    origin = f"{parts.scheme}://{parts.netloc}"
    state.policy.check_allowed(origin)
    task_id = task_id_for_url(url, state.policy.filters)
    authorization = request.headers.get("Authorization")
    blob_request = BlobRequest(task_id=task_id, url=url, digest=None, authorization=authorization)
    download, task = await state.downloader.open(blob_request, 0, None, prefetch=True)
    byte_range = parse_range_header(request.headers.get("Range"), task.content_length)
    headers = {"Accept-Ranges": "bytes", "Damselfly-Task-Id": task_id}
    first, last, status = 0, task.content_length - 1, 200
    if byte_range is not None:
        (first, last), status = byte_range, 206
        headers["Content-Range"] = f"bytes {first}-{last}/{task.content_length}"
    headers["Content-Length"] = str(last - first + 1 if task.content_length else 0)
    return StreamingResponse(
        state.downloader.stream(download, task, first, last),
        status_code=status,
        headers=headers,
        media_type="application/octet-stream",
    )


def urlparse_http(url: str) -> SplitResult:
    """``url`` split, or InvalidRequest when it is not an absolute http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidRequest(f"not an http(s) URL: {url!r}")
    return parts
