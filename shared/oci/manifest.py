"""OCI / Docker v2 manifests, indexes and descriptors: parsing untrusted JSON, platform choice, encoding."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.errors import InvalidRequest, MalformedMessage, NotFound

from .mediatypes import DOCKER_SCHEMA1, INDEX_TYPES, MANIFEST_TYPES, OCI_INDEX, OCI_MANIFEST
from .reference import check_digest

#: Registries refuse manifests above 4 MiB; anything bigger is not a manifest we want to parse.
MAX_MANIFEST_SIZE = 4 << 20


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: object) -> bytes:
    """Compact JSON with keys in insertion order: the same object always encodes to the same bytes."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Platform:
    """An ``os/architecture[/variant]`` triple."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``linux/amd64`` or ``linux/arm64/v8``."""
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidRequest(f"invalid platform {text!r} (expected OS/ARCH[/VARIANT], e.g. linux/amd64)")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, other: Mapping[str, Any]) -> bool:
        """Whether an index entry's ``platform`` object satisfies this one."""
        if other.get("os") != self.os or other.get("architecture") != self.architecture:
            return False
        if self.variant is None:
            return True
        variant = other.get("variant")
        # arm64 images usually leave out the only variant there is.
        if variant is None and self.architecture == "arm64":
            variant = "v8"
        return bool(variant == self.variant)

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Mapping[str, Any] | None = None
    urls: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, obj: object, what: str) -> Descriptor:
        """Validate and build from a descriptor object of untrusted JSON."""
        if not isinstance(obj, dict):
            raise MalformedMessage(f"{what}: descriptor is not an object")
        media_type, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
        if not isinstance(media_type, str) or not isinstance(digest, str):
            raise MalformedMessage(f"{what}: descriptor lacks mediaType or digest")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise MalformedMessage(f"{what}: descriptor {digest} has no valid size")
        try:
            check_digest(digest)
        except InvalidRequest as exc:
            raise MalformedMessage(f"{what}: {exc.message}") from None
        annotations = obj.get("annotations") or {}
        if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
            raise MalformedMessage(f"{what}: descriptor {digest} has malformed annotations")
        platform = obj.get("platform")
        urls = obj.get("urls") or []
        return cls(
            media_type,
            digest,
            size,
            dict(annotations),
            platform if isinstance(platform, dict) else None,
            tuple(str(u) for u in urls) if isinstance(urls, list) else (),
        )

    def to_json(self) -> dict[str, Any]:
        """The descriptor as manifest JSON (fields in the spec's order)."""
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


@dataclass(frozen=True)
class ImageManifest:
    """An image manifest (OCI or Docker schema 2) and the exact bytes it was read from."""

    media_type: str
    digest: str
    raw: bytes
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageIndex:
    """An OCI index or Docker manifest list."""

    media_type: str
    digest: str
    raw: bytes
    manifests: tuple[Descriptor, ...]

    def select(self, platform: Platform, what: str) -> Descriptor:
        """The entry for ``platform`` (NotFound naming the platforms there are)."""
        for entry in self.manifests:
            if entry.platform is not None and platform.matches(entry.platform):
                return entry
        # An index without platforms on its entries (e.g. an OCI layout with one image) means "the image".
        if len(self.manifests) == 1 and self.manifests[0].platform is None:
            return self.manifests[0]
        available = sorted(
            {
                str(Platform(str(p.get("os")), str(p.get("architecture")), p.get("variant")))
                for p in (e.platform for e in self.manifests)
                if p is not None
            }
        )
        raise NotFound(f"{what} has no image for {platform} (it has: {', '.join(available) or 'none'})")


def _load(raw: bytes, what: str) -> dict[str, Any]:
    if len(raw) > MAX_MANIFEST_SIZE:
        raise MalformedMessage(f"{what}: manifest is {len(raw)} bytes, over the {MAX_MANIFEST_SIZE} byte limit")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedMessage(f"{what}: manifest is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise MalformedMessage(f"{what}: manifest is not a JSON object")
    return doc


def parse_manifest(raw: bytes, content_type: str | None, what: str) -> ImageManifest | ImageIndex:
    """Parse an image manifest or an index from untrusted bytes.

    The media type comes from the document's ``mediaType`` when present, else the HTTP Content-Type,
    else the shape of the document (``manifests`` means an index).
    """
    doc = _load(raw, what)
    declared = doc.get("mediaType")
    kind = declared if isinstance(declared, str) and declared else (content_type or "").split(";")[0].strip()
    if kind == DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
        raise InvalidRequest(f"{what} is a Docker schema 1 manifest; only schema 2 and OCI images are supported")
    if kind in INDEX_TYPES or (kind not in MANIFEST_TYPES and "manifests" in doc):
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise MalformedMessage(f"{what}: index has no manifests list")
        return ImageIndex(
            kind if kind in INDEX_TYPES else OCI_INDEX,
            sha256_digest(raw),
            raw,
            tuple(Descriptor.from_json(e, what) for e in entries),
        )
    if kind and kind not in MANIFEST_TYPES and "layers" not in doc:
        raise InvalidRequest(f"{what} has media type {kind!r}, not an image manifest or index")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise MalformedMessage(f"{what}: manifest has no layers list")
    annotations = doc.get("annotations") or {}
    return ImageManifest(
        kind if kind in MANIFEST_TYPES else OCI_MANIFEST,
        sha256_digest(raw),
        raw,
        Descriptor.from_json(doc.get("config"), what),
        tuple(Descriptor.from_json(layer, what) for layer in layers),
        dict(annotations) if isinstance(annotations, dict) else {},
    )


def encode_manifest(
    config: Descriptor, layers: Sequence[Descriptor], annotations: Mapping[str, str] | None = None
) -> bytes:
    """Encode an OCI image manifest deterministically."""
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    if annotations:
        doc["annotations"] = dict(annotations)
    return canonical_json(doc)


def load_config(raw: bytes, what: str) -> dict[str, Any]:
    """Parse an image config blob (untrusted) into a dict."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedMessage(f"{what}: image config is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise MalformedMessage(f"{what}: image config is not a JSON object")
    return doc
