"""OCI image helpers for tests: build tiny images with umoci, push/pull with skopeo, read manifests.

Everything goes through the real tools and the real registry HTTP API; nothing is faked.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, cast

from tests.support.registry import basic_auth_header

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_ACCEPT = ", ".join([MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST, MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST])
_INDEX_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)

# The repo's shared/ folder sits beside the checkout (/work/main -> /work/shared; in CI a copy beside
# the clone), so find it relative to this file rather than by a fixed path.
_REPO_ROOT = Path(__file__).resolve().parents[2]

PYTHON_IMAGE_DIRNAME = "python-3.11"
PYTHON_IMAGE_TAG = "python"


class OciImage(NamedTuple):
    """An image in an OCI layout directory: `layout, tag = image` unpacks it."""

    layout: Path
    tag: str

    @property
    def ref(self) -> str:
        """containers-transports reference, oci:DIR:TAG, for skopeo."""
        return f"oci:{self.layout}:{self.tag}"


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor (media type, digest, size)."""

    media_type: str
    digest: str
    size: int

    @classmethod
    def from_json(cls, obj: Mapping[str, object]) -> Descriptor:
        """Build from a manifest's descriptor object."""
        return cls(media_type=str(obj["mediaType"]), digest=str(obj["digest"]), size=_as_int(obj["size"]))


@dataclass(frozen=True)
class Manifest:
    """An image manifest (not an index): its raw bytes, digest, config and layers."""

    media_type: str
    digest: str
    raw: bytes
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        """Config first, then the layers: every blob a pull fetches."""
        return (self.config, *self.layers)

    @property
    def blob_sizes(self) -> dict[str, int]:
        """digest -> size for every blob."""
        return {d.digest: d.size for d in self.blobs}

    @classmethod
    def parse(cls, raw: bytes, media_type: str | None = None) -> Manifest:
        """Parse image-manifest JSON; the digest is the sha256 of the exact bytes."""
        doc = json.loads(raw)
        kind = media_type or doc.get("mediaType") or MEDIA_OCI_MANIFEST
        if kind in _INDEX_TYPES or "manifests" in doc:
            raise ValueError(f"{kind} is an index, not an image manifest")
        return cls(
            media_type=kind,
            digest="sha256:" + hashlib.sha256(raw).hexdigest(),
            raw=raw,
            config=Descriptor.from_json(doc["config"]),
            layers=tuple(Descriptor.from_json(layer) for layer in doc["layers"]),
        )


def _as_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


# -- local layouts ---------------------------------------------------------------------------------


def shared_images_dir() -> Path:
    """The shared/images folder (DAMSELFLY_SHARED_DIR overrides the shared/ beside the checkout)."""
    override = os.environ.get("DAMSELFLY_SHARED_DIR")
    if override:
        return Path(override) / "images"
    for candidate in (_REPO_ROOT.parent / "shared", Path("/work/shared")):
        if (candidate / "images").is_dir():
            return candidate / "images"
    return _REPO_ROOT.parent / "shared" / "images"


def python_image() -> OciImage:
    """The shared python-3.11 OCI layout (read-only); FileNotFoundError with the path if missing."""
    layout = shared_images_dir() / PYTHON_IMAGE_DIRNAME
    if not (layout / "index.json").is_file() or not (layout / "oci-layout").is_file():
        raise FileNotFoundError(
            f"shared python image not found: expected an OCI layout at {layout} (tag {PYTHON_IMAGE_TAG!r}); "
            "see shared/images/README.md, or set DAMSELFLY_SHARED_DIR"
        )
    return OciImage(layout, PYTHON_IMAGE_TAG)


def _layout_blob(layout: Path, digest: str) -> bytes:
    algo, _, hexpart = digest.partition(":")
    return (layout / "blobs" / algo / hexpart).read_bytes()


def read_layout_manifest(image: OciImage) -> Manifest:
    """Read the manifest tagged `image.tag` from the layout's index.json (no network)."""
    index = json.loads((image.layout / "index.json").read_text())
    for entry in index.get("manifests", []):
        if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == image.tag:
            desc = Descriptor.from_json(entry)
            return Manifest.parse(_layout_blob(image.layout, desc.digest), desc.media_type)
    raise KeyError(f"tag {image.tag!r} not in {image.layout / 'index.json'}")


def read_layout_config(image: OciImage) -> dict[str, object]:
    """The image config JSON from the layout."""
    manifest = read_layout_manifest(image)
    return cast(dict[str, object], json.loads(_layout_blob(image.layout, manifest.config.digest)))


def _run(cmd: Sequence[str], *, timeout: float = 120.0, cwd: Path | None = None) -> str:
    """Run a tool; on failure raise with its stderr so the test report says why."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc.stdout


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} not found on PATH (apt-get install {name})")
    return path


def build_small_image(
    workdir: Path,
    files: Mapping[str, bytes],
    *,
    tag: str = "latest",
    cmd: Sequence[str] = ("/app/run",),
    entrypoint: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    more_layers: Sequence[Mapping[str, bytes]] = (),
    modes: Mapping[str, int] | None = None,
) -> OciImage:
    """Build a tiny OCI layout at workdir/layout: one layer of `files`, one per `more_layers` entry.

    Paths in `files` are relative to the rootfs ("app/x" or "/app/x"); files are 0644 unless `modes`
    says otherwise. The layout is garbage-collected so its blobs are exactly the image's.
    """
    umoci = _tool("umoci")
    layout = workdir / "layout"
    bundle = workdir / "bundle"
    image = f"{layout}:{tag}"
    _run([umoci, "init", "--layout", str(layout)])
    _run([umoci, "new", "--image", image])
    # --rootless: no chown to image uids, so this works as root and as an ordinary user alike.
    _run([umoci, "unpack", "--rootless", "--image", image, str(bundle)])
    rootfs = bundle / "rootfs"
    for layer in (files, *more_layers):
        for rel, content in layer.items():
            target = rootfs / rel.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            target.chmod((modes or {}).get(rel, 0o644))
        _run([umoci, "repack", "--image", image, str(bundle)])
    config_args: list[str] = []
    for arg in cmd:
        config_args += ["--config.cmd", arg]
    for arg in entrypoint:
        config_args += ["--config.entrypoint", arg]
    for key, value in (env or {}).items():
        config_args += ["--config.env", f"{key}={value}"]
    if config_args:
        _run([umoci, "config", "--image", image, *config_args])
    # repack/config leave superseded manifests and configs behind; drop them.
    _run([umoci, "gc", "--layout", str(layout)])
    shutil.rmtree(bundle)
    return OciImage(layout, tag)


# -- skopeo ----------------------------------------------------------------------------------------


def _skopeo_copy(src: str, dest: str, extra: Sequence[str], timeout: float) -> str:
    skopeo = _tool("skopeo")
    with tempfile.TemporaryDirectory(prefix="damselfly-skopeo-") as tmp:
        # A policy of our own: the machine's /etc/containers/policy.json may be missing or strict.
        policy = Path(tmp) / "policy.json"
        policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        digestfile = Path(tmp) / "digest"
        _run(
            [
                skopeo,
                "--policy",
                str(policy),
                "copy",
                "--quiet",
                # Blobs and manifest byte-for-byte as in the source, so digests match the layout.
                "--preserve-digests",
                "--digestfile",
                str(digestfile),
                *extra,
                src,
                dest,
            ],
            timeout=timeout,
        )
        return digestfile.read_text().strip()


def _split_ref(repo_ref: str, default_tag: str) -> tuple[str, str]:
    # A ':' after the last '/' is a tag separator; one before it would belong to a host:port.
    name, sep, tag = repo_ref.rpartition(":")
    if sep and "/" not in tag:
        return name, tag
    return repo_ref, default_tag


def push_oci_layout(
    layout_dir: Path,
    tag: str,
    registry_host: str,
    repo_ref: str,
    *,
    creds: tuple[str, str] | None = None,
    timeout: float = 300.0,
) -> str:
    """Push oci:layout_dir:tag to docker://registry_host/repo_ref over plain HTTP; return the manifest digest.

    `repo_ref` is "name" or "name:tag"; without a tag the source tag is used.
    """
    name, dest_tag = _split_ref(repo_ref, tag)
    extra = ["--dest-tls-verify=false"]
    if creds is not None:
        extra += ["--dest-creds", f"{creds[0]}:{creds[1]}"]
    return _skopeo_copy(f"oci:{layout_dir}:{tag}", f"docker://{registry_host}/{name}:{dest_tag}", extra, timeout)


def pull_to_oci_layout(
    registry_host: str,
    repo_ref: str,
    layout_dir: Path,
    *,
    tag: str | None = None,
    creds: tuple[str, str] | None = None,
    timeout: float = 300.0,
) -> OciImage:
    """Copy docker://registry_host/repo_ref into an OCI layout (created if needed); return it."""
    name, src_tag = _split_ref(repo_ref, "latest")
    dest_tag = tag or src_tag
    extra = ["--src-tls-verify=false"]
    if creds is not None:
        extra += ["--src-creds", f"{creds[0]}:{creds[1]}"]
    _skopeo_copy(f"docker://{registry_host}/{name}:{src_tag}", f"oci:{layout_dir}:{dest_tag}", extra, timeout)
    return OciImage(layout_dir, dest_tag)


# -- registry HTTP API -----------------------------------------------------------------------------


def _headers(auth: tuple[str, str] | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    headers = dict(extra or {})
    if auth is not None:
        headers["Authorization"] = basic_auth_header(*auth)
    return headers


def _get(url: str, headers: Mapping[str, str], timeout: float) -> tuple[bytes, str]:
    req = urllib.request.Request(url, headers=dict(headers))
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        body: bytes = resp.read()
        content_type: str = resp.headers.get("Content-Type", "")
        return body, content_type.split(";")[0].strip()


def get_manifest(
    registry_url: str,
    repo: str,
    reference: str,
    *,
    auth: tuple[str, str] | None = None,
    platform: tuple[str, str] = ("linux", "amd64"),
    timeout: float = 30.0,
) -> Manifest:
    """GET /v2/<repo>/manifests/<reference>; an index is resolved to `platform` (or its only entry)."""
    headers = _headers(auth, {"Accept": MANIFEST_ACCEPT})
    raw, content_type = _get(f"{registry_url}/v2/{repo}/manifests/{reference}", headers, timeout)
    doc = json.loads(raw)
    kind = content_type or doc.get("mediaType", "")
    if kind in _INDEX_TYPES or "manifests" in doc:
        entries = doc["manifests"]
        chosen = next(
            (
                e
                for e in entries
                if (e.get("platform", {}).get("os"), e.get("platform", {}).get("architecture")) == platform
            ),
            entries[0] if len(entries) == 1 else None,
        )
        if chosen is None:
            raise LookupError(f"{repo}:{reference} has no manifest for {platform}")
        return get_manifest(registry_url, repo, chosen["digest"], auth=auth, timeout=timeout)
    return Manifest.parse(raw, kind)


def image_blobs(
    registry_url: str, repo: str, reference: str, *, auth: tuple[str, str] | None = None
) -> list[Descriptor]:
    """Config and layer descriptors (digest, size, media type) of an image in a registry."""
    return list(get_manifest(registry_url, repo, reference, auth=auth).blobs)


class OriginLayer(NamedTuple):
    """The python image's largest layer, as pushed to a test origin."""

    data: bytes
    digest: str
    size: int


def push_python_layer(registry_host: str, registry_url: str) -> OriginLayer:
    """Push the python image as ``library/python:3.11`` and return its largest layer (a ~50 MB blob)."""
    image = python_image()
    push_oci_layout(image.layout, image.tag, registry_host, "library/python:3.11")
    layer = max(image_blobs(registry_url, "library/python", "3.11"), key=lambda blob: blob.size)
    data = (image.layout / "blobs" / "sha256" / layer.digest.removeprefix("sha256:")).read_bytes()
    return OriginLayer(data, layer.digest, layer.size)


def fetch_blob(
    registry_url: str,
    repo: str,
    digest: str,
    *,
    byte_range: tuple[int, int] | None = None,
    auth: tuple[str, str] | None = None,
    timeout: float = 120.0,
) -> bytes:
    """GET a blob, whole or bytes [start, end] inclusive (an HTTP Range)."""
    extra = {} if byte_range is None else {"Range": f"bytes={byte_range[0]}-{byte_range[1]}"}
    body, _ = _get(f"{registry_url}/v2/{repo}/blobs/{digest}", _headers(auth, extra), timeout)
    return body


def fetch_config(
    registry_url: str, repo: str, reference: str, *, auth: tuple[str, str] | None = None
) -> dict[str, object]:
    """The image config JSON of repo:reference from a registry."""
    manifest = get_manifest(registry_url, repo, reference, auth=auth)
    raw = fetch_blob(registry_url, repo, manifest.config.digest, auth=auth)
    return cast(dict[str, object], json.loads(raw))
