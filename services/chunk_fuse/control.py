"""A blocking client of a mount daemon's control API (HTTP on its unix socket), for tools and tests."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

from services.chunk_fuse.records import find_record
from shared.errors import DependencyUnavailable, NotFound


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("daemon", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self.socket_path))
        self.sock = sock


def control_get(socket_path: Path, path: str, timeout: float = 10.0) -> dict[str, Any]:
    """GET ``path`` from the daemon listening on ``socket_path``; the JSON body."""
    connection = _UnixConnection(socket_path, timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
    except OSError as exc:
        raise DependencyUnavailable(f"mount daemon at {socket_path} unreachable: {exc}") from exc
    finally:
        connection.close()
    if response.status != 200:
        raise DependencyUnavailable(f"mount daemon at {socket_path} answered {response.status}")
    answer: dict[str, Any] = json.loads(body)
    return answer


def mount_stats(mountpoint: Path, run_dir: Path | None = None) -> dict[str, Any]:
    """The stats of the mount at ``mountpoint`` (NotFound if no daemon serves it)."""
    record = find_record(mountpoint, run_dir)
    if record is None:
        raise NotFound(f"no lazy mount at {mountpoint}")
    return control_get(record.control_socket, "/api/v1/stats")
