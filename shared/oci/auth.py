"""Registry credentials: ``USER:PASS`` from the command line, or the auths of Docker's and Podman's config files."""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from shared.errors import InvalidRequest

from .reference import DOCKER_HUB, DOCKER_HUB_API


@dataclass(frozen=True)
class Credentials:
    """A user name and password for HTTP basic auth (and for a token service's basic challenge)."""

    username: str
    password: str

    @classmethod
    def parse(cls, text: str) -> Credentials:
        """Parse ``USER:PASS`` (the password may contain ':')."""
        user, sep, password = text.partition(":")
        if not sep or not user:
            raise InvalidRequest("credentials must be USER:PASS")
        return cls(user, password)

    @property
    def header(self) -> str:
        """The ``Authorization`` header value."""
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    def __repr__(self) -> str:
        # Never print the password, even in a traceback.
        return f"Credentials(username={self.username!r}, password=***)"


def auth_files(env: Mapping[str, str] | None = None) -> list[Path]:
    """Config files that may hold registry auths, in the order Docker and Podman users expect."""
    env = os.environ if env is None else env
    files = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    docker_dir = Path(env["DOCKER_CONFIG"]) if env.get("DOCKER_CONFIG") else Path.home() / ".docker"
    files.append(docker_dir / "config.json")
    if env.get("XDG_RUNTIME_DIR"):
        files.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    return files


def _keys_for(host: str) -> list[str]:
    keys = [host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"https://{host}/v2/"]
    if host in (DOCKER_HUB, DOCKER_HUB_API, "index.docker.io"):
        keys += ["https://index.docker.io/v1/", "index.docker.io", DOCKER_HUB]
    return keys


def _from_entry(entry: object) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            decoded = base64.b64decode(encoded, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, password = decoded.partition(":")
        return Credentials(user, password) if sep and user else None
    username, secret = entry.get("username"), entry.get("password")
    if isinstance(username, str) and username and isinstance(secret, str):
        return Credentials(username, secret)
    return None


def credentials_from_config(host: str, files: list[Path] | None = None) -> Credentials | None:
    """Credentials for ``host`` from the first auth file that has them (credential helpers are not run)."""
    for path in auth_files() if files is None else files:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        auths = doc.get("auths") if isinstance(doc, dict) else None
        if not isinstance(auths, dict):
            continue
        for key in _keys_for(host):
            creds = _from_entry(auths.get(key))
            if creds is not None:
                return creds
    return None


def resolve_credentials(host: str, explicit: str | None) -> Credentials | None:
    """``--creds`` if given, else the config files' entry for ``host``, else anonymous."""
    if explicit:
        return Credentials.parse(explicit)
    return credentials_from_config(host)
