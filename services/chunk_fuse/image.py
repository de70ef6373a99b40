"""Opening a converted image: manifest, config and bootstrap, the only things a mount needs up front."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.chunk_fuse.backend import RegistryBackend
from shared.errors import BlobDigestMismatch, InvalidRequest
from shared.image_format import Bootstrap
from shared.oci.manifest import Descriptor, Platform
from shared.oci.mediatypes import DAMSELFLY_BLOB, DAMSELFLY_BOOTSTRAP
from shared.oci.reference import RegistryRef, parse_reference
from shared.oci.store import resolve_image

DEFAULT_PLATFORM = Platform("linux", "amd64")


@dataclass(frozen=True)
class LazyImage:
    """A converted image resolved for one platform, with its bootstrap loaded."""

    ref: RegistryRef
    digest: str
    config: dict[str, Any]
    bootstrap: Bootstrap
    bootstrap_descriptor: Descriptor
    blobs: tuple[Descriptor, ...]
    bootstrap_from_cache: bool

    @property
    def runtime_config(self) -> dict[str, Any]:
        """The image config's ``config`` block (Env, Cmd, WorkingDir, User...), empty when absent."""
        block = self.config.get("config")
        return block if isinstance(block, dict) else {}


def registry_ref(image: str) -> RegistryRef:
    """The registry reference of an image name; layouts cannot be mounted lazily."""
    ref = parse_reference(image)
    if not isinstance(ref, RegistryRef):
        raise InvalidRequest(f"{image}: only images in a registry can be mounted (not an oci: layout)")
    return ref


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as sink:
            sink.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


async def open_image(
    backend: RegistryBackend, cache_dir: Path | None, platform: Platform = DEFAULT_PLATFORM
) -> LazyImage:
    """Resolve the manifest (through any index), check it is a Damselfly image, and load its bootstrap.

    The bootstrap is kept in ``cache_dir/bootstraps`` by digest, so a second mount reads it from disk.
    """
    ref = backend.ref

    async def fetch(desc: Descriptor | None) -> tuple[bytes, str | None]:
        return await backend.get_manifest(ref.reference if desc is None else desc.digest)

    async def read_small(desc: Descriptor) -> bytes:
        return await backend.get_blob(desc.digest, desc.size)

    resolved = await resolve_image(str(ref), fetch, read_small, platform, pinned=ref.digest)
    layers = resolved.manifest.layers
    boots = [d for d in layers if d.media_type == DAMSELFLY_BOOTSTRAP]
    if len(boots) != 1 or layers[-1].media_type != DAMSELFLY_BOOTSTRAP:
        raise InvalidRequest(
            f"{ref} is not a Damselfly lazy image (convert it with `damselfly convert`): "
            f"expected one {DAMSELFLY_BOOTSTRAP} layer, last"
        )
    boot_desc = boots[0]
    blobs = tuple(d for d in layers if d.media_type == DAMSELFLY_BLOB)
    cached_path = cache_dir / "bootstraps" / boot_desc.digest.split(":", 1)[1] if cache_dir else None
    data: bytes | None = None
    from_cache = False
    if cached_path is not None and cached_path.is_file():
        candidate = cached_path.read_bytes()
        # Content-addressed, yet checked: a truncated or tampered file is fetched again.
        if "sha256:" + hashlib.sha256(candidate).hexdigest() == boot_desc.digest:
            data, from_cache = candidate, True
    if data is None:
        data = await backend.get_blob(boot_desc.digest, boot_desc.size)
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != boot_desc.digest or len(data) != boot_desc.size:
            raise BlobDigestMismatch(boot_desc.digest, actual, what=f"bootstrap of {ref}")
        if cached_path is not None:
            _write_atomically(cached_path, data)
    bootstrap = Bootstrap.load(data)
    listed = {d.digest: d.size for d in blobs}
    for blob in bootstrap.blobs:
        if listed.get(blob.digest) != blob.compressed_size:
            raise InvalidRequest(f"{ref}: the bootstrap names blob {blob.digest}, which the manifest does not list")
    return LazyImage(ref, resolved.digest, resolved.config, bootstrap, boot_desc, blobs, from_cache)
