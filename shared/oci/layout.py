"""OCI image-layout directories (``oci:DIR:TAG``) as a source and a target of conversions."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

from shared.errors import BlobDigestMismatch, InvalidRequest, MalformedMessage, NotFound

from .manifest import Descriptor, ImageIndex, Platform, canonical_json, sha256_digest
from .mediatypes import ANNOTATION_REF_NAME, OCI_INDEX
from .progress import ProgressTask
from .reference import DEFAULT_TAG, LayoutRef, check_digest
from .store import ResolvedImage, resolve_image, sha256_file

_LAYOUT_FILE = "oci-layout"
_INDEX_FILE = "index.json"


class LayoutStore:
    """An image in an OCI layout directory: read through ``index.json``, written by adding blobs and a tag."""

    def __init__(self, ref: LayoutRef) -> None:
        self.ref = ref
        self.root = ref.path
        self.name = str(ref)

    # -- paths -------------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Where a blob lives; the digest is validated so JSON in the layout cannot name other paths."""
        try:
            check_digest(digest)
        except InvalidRequest as exc:
            raise MalformedMessage(f"{self.name}: {exc.message}") from None
        return self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def _read_index(self) -> dict[str, Any]:
        path = self.root / _INDEX_FILE
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise NotFound(f"{self.root} is not an OCI layout (no {_INDEX_FILE})") from None
        except (OSError, ValueError) as exc:
            raise MalformedMessage(f"cannot read {path}: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("manifests", []), list):
            raise MalformedMessage(f"{path} is not an OCI index")
        return doc

    # -- reading -----------------------------------------------------------------------------------

    async def resolve(self, platform: Platform) -> ResolvedImage:
        """The image tagged ``ref.tag`` (or pinned by digest, or the only one), for ``platform``."""

        async def fetch(desc: Descriptor | None) -> tuple[bytes, str | None]:
            if desc is None:
                return self._top_document(platform)
            return self._read_small(desc), desc.media_type

        async def read_small(desc: Descriptor) -> bytes:
            return self._read_small(desc)

        return await resolve_image(self.name, fetch, read_small, platform)

    def _top_document(self, platform: Platform) -> tuple[bytes, str | None]:
        # index.json is an index whose entries are told apart by ref.name (tag) rather than platform:
        # narrow it to the named entry first, then resolve that like any manifest or index.
        index = self._read_index()
        entries = index.get("manifests", [])
        if self.ref.digest:
            chosen = [e for e in entries if isinstance(e, dict) and e.get("digest") == self.ref.digest]
        elif self.ref.tag:
            chosen = [
                e
                for e in entries
                if isinstance(e, dict) and (e.get("annotations") or {}).get(ANNOTATION_REF_NAME) == self.ref.tag
            ]
        else:
            chosen = entries
        if not chosen:
            raise NotFound(f"{self.name}: no such image in {self.root / _INDEX_FILE}")
        if len(chosen) > 1 and not self.ref.tag and not self.ref.digest:
            # Several untagged choices are fine only if they differ by platform, like any index.
            if not any(isinstance(e, dict) and e.get("platform") for e in chosen):
                tags = sorted(
                    str((e.get("annotations") or {}).get(ANNOTATION_REF_NAME, "?"))
                    for e in chosen
                    if isinstance(e, dict)
                )
                raise InvalidRequest(
                    f"{self.name} holds {len(chosen)} images; name one as oci:DIR:TAG ({', '.join(tags)})"
                )
            narrowed = ImageIndex(OCI_INDEX, "", b"", tuple(Descriptor.from_json(e, self.name) for e in chosen))
            chosen = [next(e for e in chosen if e.get("digest") == narrowed.select(platform, self.name).digest)]
        desc = Descriptor.from_json(chosen[0], self.name)
        return self._read_small(desc), desc.media_type

    def _read_small(self, desc: Descriptor) -> bytes:
        path = self.blob_path(desc.digest)
        try:
            if path.stat().st_size != desc.size:
                raise BlobDigestMismatch(desc.digest, f"a blob of {path.stat().st_size} bytes", what=self.name)
            return path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{self.name}: blob {desc.digest} is missing from the layout") from None

    async def fetch_blob(
        self, desc: Descriptor, directory: Path, progress: ProgressTask, *, verify: bool = True
    ) -> Path:
        """The blob's own file in the layout (no copy); hashed first unless ``verify`` is False."""
        path = self.blob_path(desc.digest)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise NotFound(f"{self.name}: blob {desc.digest} is missing from the layout") from None
        if size != desc.size:
            raise BlobDigestMismatch(
                desc.digest, f"a blob of {size} bytes (manifest says {desc.size})", what=f"{self.name}: blob"
            )
        if verify:
            actual, _ = await asyncio.to_thread(sha256_file, path, progress)
            if actual != desc.digest:
                raise BlobDigestMismatch(desc.digest, actual, what=f"{self.name}: blob")
        else:
            progress.advance(size)
        return path

    # -- writing -----------------------------------------------------------------------------------

    async def check_writable(self) -> None:
        """The directory must be a layout already, or not exist yet, or be empty."""
        if self.ref.digest:
            raise InvalidRequest(f"target {self.name} must name a tag, not a digest")
        self._check_layout_dir()

    def _check_layout_dir(self) -> bool:
        if (self.root / _LAYOUT_FILE).is_file():
            return True
        if self.root.exists() and (not self.root.is_dir() or any(self.root.iterdir())):
            raise InvalidRequest(f"{self.root} exists and is not an OCI layout; refusing to write into it")
        return False

    def _ensure_layout(self) -> None:
        if self._check_layout_dir():
            return
        marker = self.root / _LAYOUT_FILE
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        _atomic_write(marker, b'{"imageLayoutVersion":"1.0.0"}')
        _atomic_write(self.root / _INDEX_FILE, canonical_json({"schemaVersion": 2, "manifests": []}))

    async def push_blob(self, desc: Descriptor, path: Path, progress: ProgressTask) -> bool:
        """Copy the blob in unless a file of the right size is already there."""
        self._ensure_layout()
        dest = self.blob_path(desc.digest)
        if dest.is_file() and dest.stat().st_size == desc.size:
            progress.advance(desc.size)
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        await asyncio.to_thread(shutil.copyfile, path, tmp)
        os.replace(tmp, dest)
        progress.advance(desc.size)
        return True

    async def push_manifest(self, raw: bytes, media_type: str) -> str:
        """Write the manifest blob and point the tag (``latest`` if none) at it in ``index.json``."""
        if self.ref.digest:
            raise InvalidRequest(f"target {self.name} must name a tag, not a digest")
        self._ensure_layout()
        digest = sha256_digest(raw)
        path = self.blob_path(digest)
        if not path.is_file():
            _atomic_write(path, raw)
        tag = self.ref.tag or DEFAULT_TAG
        index = self._read_index()
        kept = [
            e
            for e in index.get("manifests", [])
            if not (isinstance(e, dict) and (e.get("annotations") or {}).get(ANNOTATION_REF_NAME) == tag)
        ]
        entry = {"mediaType": media_type, "digest": digest, "size": len(raw), "annotations": {ANNOTATION_REF_NAME: tag}}
        index["manifests"] = [*kept, entry]
        index.setdefault("schemaVersion", 2)
        _atomic_write(self.root / _INDEX_FILE, canonical_json(index))
        return digest


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
