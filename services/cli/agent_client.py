"""Calls to a node's chunk-fuse agent (``/api/v1/mounts``), standard library only: ``damselfly run --agent``
imports this on its way to starting a container."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from shared.errors import DependencyUnavailable, UpstreamError


def _call(agent: str, method: str, path: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"{agent.rstrip('/')}/api/v1{path}", data=data, headers={"Content-Type": "application/json"}, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer: dict[str, Any] = json.loads(response.read() or b"{}")
            return answer
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        try:
            message = json.loads(text).get("message") or text
        except (ValueError, AttributeError):
            message = text
        raise UpstreamError(f"agent {agent}: {message}") from None
    except OSError as exc:
        raise DependencyUnavailable(f"agent {agent} unreachable: {exc}") from exc


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
