"""Calls to a node's chunk-fuse agent (``/api/v1/mounts``), standard library only: ``damselfly run --agent``
imports this on its way to starting a container."""

from __future__ import annotations

import json
import socket
from typing import Any
from urllib.parse import urlsplit

from shared.errors import DependencyUnavailable, UpstreamError


def _call(agent: str, method: str, path: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
    status, raw = _http(agent, method, path, body, timeout)
    if status >= 400:
        text = raw.decode(errors="replace")
        try:
            message = json.loads(text).get("message") or text
        except (ValueError, AttributeError):
            message = text
        raise UpstreamError(f"agent {agent}: {message}")
    answer: dict[str, Any] = json.loads(raw or b"{}")
    return answer


def _http(agent: str, method: str, path: str, body: dict[str, Any] | None, timeout: float) -> tuple[int, bytes]:
    """One HTTP/1.1 request to the node's agent (plain http, one connection, closed after it).

    A socket rather than http.client or urllib: a container start would otherwise read ssl, email and
    their kin from disk just to talk to localhost.
    """
    parts = urlsplit(agent)
    if parts.scheme != "http" or not parts.hostname:
        raise DependencyUnavailable(f"agent {agent}: expected an http://HOST:PORT URL")
    data = json.dumps(body).encode() if body is not None else b""
    host = f"{parts.hostname}:{parts.port or 80}"
    head = (
        f"{method} {parts.path.rstrip('/')}/api/v1{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    try:
        # An ASCII host goes to getaddrinfo as bytes: a str would be IDNA-encoded, which imports
        # encodings.idna, unicodedata and stringprep (read from disk at a cold container start).
        address = parts.hostname.encode("ascii") if parts.hostname.isascii() else parts.hostname
        with socket.create_connection((address, parts.port or 80), timeout=timeout) as connection:  # type: ignore[arg-type]
            connection.sendall(head.encode() + data)
            chunks = []
            while block := connection.recv(65536):
                chunks.append(block)
    except OSError as exc:
        raise DependencyUnavailable(f"agent {agent} unreachable: {exc}") from exc
    response = b"".join(chunks)
    header, _, payload = response.partition(b"\r\n\r\n")
    lines = header.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        raise DependencyUnavailable(f"agent {agent} answered something that is not HTTP: {lines[0]!r}") from None
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding", "").lower() == "chunked":
        payload = _dechunk(payload)
    return status, payload


def _dechunk(payload: bytes) -> bytes:
    body = b""
    while payload:
        size_line, _, rest = payload.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        body += rest[:size]
        payload = rest[size + 2 :]
    return body


def create_mount(
    agent: str,
    image: str,
    mountpoint: str,
    *,
    config: dict[str, Any] | None = None,
    mirror: str | None = None,
    insecure: bool = False,
    platform: str = "linux/amd64",
) -> dict[str, Any]:
    """Ask the agent to mount ``image`` (``config`` as written; the agent validates it and fills the gaps)."""
    body = {
        "image": image,
        "mountpoint": mountpoint,
        "config": config,
        "mirror": mirror,
        "insecure": insecure,
        "platform": platform,
    }
    return _call(agent, "POST", "/mounts", body, timeout=180)


def delete_mount(agent: str, mount_id: str, *, lazy: bool = False) -> None:
    """Ask the agent to end one of its mounts."""
    _call(agent, "DELETE", f"/mounts/{mount_id}" + ("?lazy=true" if lazy else ""), None, timeout=60)
