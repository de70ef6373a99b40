"""Image resolution for preheat: which blobs make up an image, read from its origin by a seed.

The scheduler's preheat jobs need an image's manifests, but only seeds talk to origins (they hold the
allow-list, the credentials path and the rate limit), so the scheduler asks a seed-fetcher over core
NATS request/reply. An index is followed to the requested platform, or to every platform it lists when
none is given; attestation manifests (``unknown/unknown``) are not images and are skipped. Every
document read through a descriptor is checked against its digest.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import aiohttp

from shared import subjects
from shared.bus import Bus
from shared.errors import BlobDigestMismatch, DependencyUnavailable, Forbidden, InvalidRequest, MalformedMessage
from shared.oci.manifest import MAX_MANIFEST_SIZE, Descriptor, ImageIndex, ImageManifest, Platform, parse_manifest
from shared.oci.manifest import sha256_digest as manifest_digest
from shared.oci.mediatypes import MANIFEST_ACCEPT
from shared.oci.reference import DOCKER_HUB, RegistryRef, parse_reference
from shared.registry_client import OriginClient, normalise_origin, raise_for_origin_status
from shared.schemas import ImageResolveReply, ImageResolveRequest, ResolvedBlob

logger = logging.getLogger(__name__)

QUEUE_GROUP = "seed-resolvers"
# Docker Hub is reached through either API host; Dragonfly configurations name index.docker.io.
_DOCKER_HUB_HOSTS = ("index.docker.io", "registry-1.docker.io")
# An index that lists more images than this is not something to preheat in one job.
MAX_PLATFORMS = 32


class ImageResolver:
    """Answers ImageResolveRequests: the manifests and deduplicated blobs of an image."""

    def __init__(self, origin: OriginClient, allowed_origins: Iterable[str]) -> None:
        self.origin = origin
        self.allowed_origins = {normalise_origin(url) for url in allowed_origins}

    async def serve(self, bus: Bus) -> None:
        """Answer resolution requests in the seeds' queue group."""
        await bus.serve(subjects.IMAGE_RESOLVE_REQUEST, ImageResolveRequest, self, queue=QUEUE_GROUP)

    def base_url(self, ref: RegistryRef) -> str:
        """The allowed origin serving ``ref``'s registry: the allow-list also says http or https."""
        hosts = _DOCKER_HUB_HOSTS if ref.host == DOCKER_HUB else (ref.host,)
        for host in hosts:
            for scheme in ("https", "http"):
                if normalise_origin(f"{scheme}://{host}") in self.allowed_origins:
                    return f"{scheme}://{host}"
        raise Forbidden(f"registry {ref.host} is not on the seed's allow-list", registry=ref.host)

    async def __call__(self, request: ImageResolveRequest) -> ImageResolveReply:
        ref = parse_reference(request.image)
        if not isinstance(ref, RegistryRef):
            raise InvalidRequest(f"{request.image!r} is not a registry reference (HOST/REPO[:TAG|@DIGEST])")
        platform = Platform.parse(request.platform) if request.platform else None
        base = self.base_url(ref)
        what = str(ref)

        raw, content_type = await self._manifest(base, ref, ref.reference, request.authorization)
        if ref.digest is not None and manifest_digest(raw) != ref.digest:
            raise BlobDigestMismatch(ref.digest, manifest_digest(raw), what=f"manifest of {what}")
        top = parse_manifest(raw, content_type, what)
        manifests: list[ImageManifest] = []
        platforms: list[str] = []
        if isinstance(top, ImageManifest):
            manifests.append(top)
            platforms.append(request.platform or "")
        else:
            for entry in self._entries(top, platform, what):
                raw, content_type = await self._manifest(base, ref, entry.digest, request.authorization)
                if manifest_digest(raw) != entry.digest:
                    raise BlobDigestMismatch(entry.digest, manifest_digest(raw), what=f"manifest of {what}")
                doc = parse_manifest(raw, content_type or entry.media_type, what)
                if not isinstance(doc, ImageManifest):
                    raise MalformedMessage(f"{what}: index entry {entry.digest} is itself an index")
                manifests.append(doc)
                platforms.append(_platform_text(entry))

        blobs: dict[str, ResolvedBlob] = {}
        for manifest in manifests:
            for desc in (manifest.config, *manifest.layers):
                blobs.setdefault(
                    desc.digest,
                    ResolvedBlob(
                        digest=desc.digest,
                        size=desc.size,
                        media_type=desc.media_type,
                        url=f"{base}/v2/{ref.repository}/blobs/{desc.digest}",
                    ),
                )
        logger.info(
            "resolved image",
            extra={"image": what, "manifests": len(manifests), "blobs": len(blobs), "job": request.job_id},
        )
        return ImageResolveReply(
            image=what,
            manifests=[manifest.digest for manifest in manifests],
            platforms=platforms,
            blobs=list(blobs.values()),
        )

    @staticmethod
    def _entries(index: ImageIndex, platform: Platform | None, what: str) -> list[Descriptor]:
        if platform is not None:
            return [index.select(platform, what)]
        images = [entry for entry in index.manifests if not _is_attestation(entry)]
        if not images:
            raise InvalidRequest(f"{what}: the index lists no image manifest")
        if len(images) > MAX_PLATFORMS:
            raise InvalidRequest(f"{what}: the index lists {len(images)} images; name a platform")
        return images

    async def _manifest(
        self, base: str, ref: RegistryRef, reference: str, authorization: str | None
    ) -> tuple[bytes, str | None]:
        url = f"{base}/v2/{ref.repository}/manifests/{reference}"
        response = await self.origin.request(
            "GET", url, headers={"Accept": MANIFEST_ACCEPT}, authorization=authorization, timeout=30.0
        )
        try:
            raise_for_origin_status(response, url)
            length = response.content_length or 0
            if length > MAX_MANIFEST_SIZE:
                raise MalformedMessage(f"{url}: manifest of {length} bytes is over the limit")
            raw = await response.content.read(MAX_MANIFEST_SIZE + 1)
            return raw, response.headers.get("Content-Type")
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise DependencyUnavailable(f"reading {url} failed: {exc}") from exc
        finally:
            response.release()


def _is_attestation(entry: Descriptor) -> bool:
    platform = entry.platform or {}
    return platform.get("os") == "unknown" and platform.get("architecture") == "unknown"


def _platform_text(entry: Descriptor) -> str:
    platform = entry.platform or {}
    parts = [str(platform.get("os", "")), str(platform.get("architecture", ""))]
    if platform.get("variant"):
        parts.append(str(platform["variant"]))
    return "/".join(parts) if all(parts[:2]) else ""
