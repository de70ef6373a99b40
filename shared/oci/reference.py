"""Image references: ``HOST[:PORT]/REPO[:TAG|@DIGEST]`` in a registry, or ``oci:DIR[:TAG|@DIGEST]`` on disk."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from shared.errors import InvalidRequest

DOCKER_HUB = "docker.io"
#: Where Docker Hub's API actually answers (docker.io itself redirects).
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"

# The grammar of distribution/reference, restricted to what registries accept.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HOST_RE = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:]+\])(?::\d{1,5})?$"
)
#: Only sha256 digests: it is what every registry uses, and what we can verify.
DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is a well-formed sha256 digest, else raise InvalidRequest."""
    if not DIGEST_RE.match(digest):
        raise InvalidRequest(f"unsupported or malformed digest {digest!r} (expected sha256:<64 hex digits>)")
    return digest


@dataclass(frozen=True)
class RegistryRef:
    """An image in a registry."""

    host: str  # host[:port] as given ("docker.io" for Docker Hub)
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """The host that serves the distribution API (Docker Hub's differs from its name)."""
        return DOCKER_HUB_API if self.host == DOCKER_HUB else self.host

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest if pinned, else the tag (default ``latest``)."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        tail = f"@{self.digest}" if self.digest else f":{self.tag or DEFAULT_TAG}"
        return f"{self.host}/{self.repository}{tail}"


@dataclass(frozen=True)
class LayoutRef:
    """An image in an OCI image-layout directory."""

    path: Path
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        tail = f"@{self.digest}" if self.digest else (f":{self.tag}" if self.tag else "")
        return f"oci:{self.path}{tail}"


ImageRef = RegistryRef | LayoutRef


def parse_reference(text: str) -> ImageRef:
    """Parse a registry reference or an ``oci:DIR[:TAG]`` layout reference (InvalidRequest if malformed)."""
    if text.startswith("oci:"):
        return _parse_layout(text)
    return _parse_registry(text)


def _parse_layout(text: str) -> LayoutRef:
    body = text[4:]
    tag = digest = None
    if "@" in body:
        body, _, digest = body.rpartition("@")
        check_digest(digest)
    else:
        # A ':' followed by no '/' ends the directory and starts a tag; "oci:/a:b/c" is a path with a colon.
        head, sep, tail = body.rpartition(":")
        if sep and "/" not in tail:
            if not _TAG_RE.match(tail):
                raise InvalidRequest(f"invalid tag {tail!r} in {text!r}")
            body, tag = head, tail
    if not body:
        raise InvalidRequest(f"{text!r} names no directory (expected oci:DIR[:TAG])")
    return LayoutRef(Path(body), tag, digest)


def _parse_registry(text: str) -> RegistryRef:
    if not text or any(c.isspace() for c in text) or "://" in text:
        raise InvalidRequest(f"invalid image reference {text!r} (expected HOST[:PORT]/REPO[:TAG|@DIGEST])")
    name, digest = text, None
    if "@" in text:
        name, _, digest = text.partition("@")
        check_digest(digest)
    tag = None
    head, sep, tail = name.rpartition(":")
    if sep and "/" not in tail:
        name, tag = head, tail
        if not _TAG_RE.match(tag):
            raise InvalidRequest(f"invalid tag {tag!r} in {text!r}")
    first, slash, rest = name.partition("/")
    # Docker's rule: the first component is a registry host if it looks like one, else it is Docker Hub.
    if slash and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        host, repository = first, rest
    else:
        host, repository = DOCKER_HUB, name
    if host == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    if not _HOST_RE.match(host):
        raise InvalidRequest(f"invalid registry host {host!r} in {text!r}")
    if not _REPO_RE.match(repository):
        raise InvalidRequest(f"invalid repository name {repository!r} in {text!r} (lower case, digits, . _ -)")
    return RegistryRef(host, repository, tag, digest)
