"""Minimal reader of an OCI image layout directory: find a manifest's layer blobs in order."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ImageFormatError, NotFoundError

LAYER_MEDIA_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
    }
)


@dataclass(frozen=True)
class LayoutLayer:
    """One layer of an image in an OCI layout."""

    path: Path
    digest: str
    size: int
    media_type: str


def _blob(layout: Path, digest: str) -> Path:
    algo, _, hexpart = digest.partition(":")
    # Digests come from JSON inside the layout; refuse anything that could name a path outside it.
    if algo != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
        raise ImageFormatError(f"unsupported or malformed digest {digest!r}")
    return layout / "blobs" / algo / hexpart


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ImageFormatError(f"cannot read {path}: {exc}") from exc


def layout_layers(layout_dir: str | os.PathLike[str], ref: str | None = None) -> list[LayoutLayer]:
    """Layers (lowest first) of the manifest tagged ``ref`` (or the only one) in an OCI layout."""
    layout = Path(layout_dir)
    manifests = _json(layout / "index.json").get("manifests", [])
    if ref is not None:
        manifests = [m for m in manifests if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref]
    if len(manifests) != 1:
        raise NotFoundError(f"expected one manifest for ref {ref!r} in {layout}, found {len(manifests)}")
    manifest = _json(_blob(layout, manifests[0]["digest"]))
    out = []
    for layer in manifest.get("layers", []):
        media_type = layer.get("mediaType", "")
        if media_type not in LAYER_MEDIA_TYPES:
            raise ImageFormatError(f"unsupported layer media type {media_type!r}")
        out.append(LayoutLayer(_blob(layout, layer["digest"]), layer["digest"], int(layer["size"]), media_type))
    return out
