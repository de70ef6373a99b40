"""What convert, check and inspect need from an image store, whether a registry or an OCI layout."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from shared.errors import BlobDigestMismatch, InvalidRequest, MalformedMessage

from .manifest import Descriptor, ImageIndex, ImageManifest, Platform, load_config, parse_manifest, sha256_digest
from .mediatypes import INDEX_TYPES
from .progress import ProgressTask

#: An image config larger than this is not one (real ones are a few KiB; the biggest seen are ~1 MiB).
MAX_CONFIG_SIZE = 16 << 20
#: Indexes may nest (an index entry pointing at another index); real images nest at most once.
MAX_INDEX_DEPTH = 4


@dataclass(frozen=True)
class ResolvedImage:
    """One platform's image: its manifest, the index it came through (if any), and its config."""

    name: str
    manifest: ImageManifest
    index_digest: str | None
    config_raw: bytes
    config: dict[str, Any]

    @property
    def digest(self) -> str:
        """The image manifest's digest."""
        return self.manifest.digest


class ImageStore(Protocol):
    """A place images are read from and written to."""

    name: str

    async def resolve(self, platform: Platform) -> ResolvedImage:
        """Fetch the manifest (through any index, choosing ``platform``) and the config."""
        ...

    async def fetch_blob(
        self, desc: Descriptor, directory: Path, progress: ProgressTask, *, verify: bool = True
    ) -> Path:
        """A local file holding the blob (in ``directory`` unless it is local already), checked against ``desc``.

        With ``verify=False`` a store that would need an extra pass over a local file to hash it may skip
        that; the caller then checks the digest itself (the converter computes it while streaming).
        """
        ...

    async def check_writable(self) -> None:
        """Fail now, before any long work, if pushing here cannot succeed (credentials, a non-layout dir)."""
        ...

    async def push_blob(self, desc: Descriptor, path: Path, progress: ProgressTask) -> bool:
        """Store the blob unless it is there already; True if bytes were uploaded or copied."""
        ...

    async def push_manifest(self, raw: bytes, media_type: str) -> str:
        """Store the manifest under the store's tag; returns its digest."""
        ...


def sha256_file(path: Path, progress: ProgressTask) -> tuple[str, int]:
    """``sha256:<hex>`` and size of a file, advancing ``progress`` as it reads."""
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
            progress.advance(len(block))
    return "sha256:" + h.hexdigest(), size


ManifestFetcher = Callable[[Descriptor | None], Awaitable[tuple[bytes, str | None]]]
BlobReader = Callable[[Descriptor], Awaitable[bytes]]


async def resolve_image(
    name: str, fetch: ManifestFetcher, read_small_blob: BlobReader, platform: Platform, *, pinned: str | None = None
) -> ResolvedImage:
    """Follow indexes to ``platform``'s image manifest, then read its config.

    ``fetch(None)`` returns the top document (the tagged manifest, or a layout's ``index.json``);
    ``fetch(desc)`` returns the manifest a descriptor names.  ``pinned`` is a digest the top document must
    have (a reference by digest).  Every document reached through a descriptor must match its digest.
    """
    raw, content_type = await fetch(None)
    if pinned is not None and sha256_digest(raw) != pinned:
        raise BlobDigestMismatch(pinned, sha256_digest(raw), what=f"manifest of {name}")
    doc = parse_manifest(raw, content_type, name)
    index_digest = None
    for _ in range(MAX_INDEX_DEPTH):
        if isinstance(doc, ImageManifest):
            break
        index_digest = index_digest or doc.digest
        entry = doc.select(platform, name)
        raw, content_type = await fetch(entry)
        if sha256_digest(raw) != entry.digest:
            raise BlobDigestMismatch(entry.digest, sha256_digest(raw), what=f"manifest of {name}")
        doc = parse_manifest(raw, content_type or entry.media_type, name)
    if isinstance(doc, ImageIndex):
        raise MalformedMessage(f"{name}: indexes nest deeper than {MAX_INDEX_DEPTH} levels")
    if doc.config.size > MAX_CONFIG_SIZE:
        raise MalformedMessage(f"{name}: image config is {doc.config.size} bytes, over {MAX_CONFIG_SIZE}")
    if doc.config.media_type in INDEX_TYPES:
        raise InvalidRequest(f"{name}: the manifest's config is an index")
    config_raw = await read_small_blob(doc.config)
    if sha256_digest(config_raw) != doc.config.digest or len(config_raw) != doc.config.size:
        raise BlobDigestMismatch(doc.config.digest, sha256_digest(config_raw), what=f"image config of {name}")
    return ResolvedImage(name, doc, index_digest, config_raw, load_config(config_raw, name))
