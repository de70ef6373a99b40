"""``damselfly mount IMAGE MOUNTPOINT`` and ``damselfly umount MOUNTPOINT``: lazy mounts, like nydusd.

``mount`` returns once the mount is ready; a background daemon serves it (its own, or the node agent's
with ``--agent``).  ``umount`` unmounts and waits for that daemon to exit.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from services.chunk_fuse.mount_config import MountConfig, load_mount_config
from services.chunk_fuse.records import MountSpec
from services.chunk_fuse.spawn import StartedMount, start_daemon, stop_mount
from shared.errors import DamselflyError, DependencyUnavailable, UpstreamError

err = Console(stderr=True)

MOUNT_EPILOG = (
    "Examples:\n\n"
    "  damselfly mount 127.0.0.1:5000/library/python:3.11-lazy /mnt/python --insecure\n\n"
    "  damselfly mount registry.example.com/app:v2-lazy /mnt/app --mirror http://127.0.0.1:65001\n\n"
    "  damselfly mount 127.0.0.1:5000/app:lazy /mnt/app --config /etc/nydus/nydusd-config.json --insecure\n\n"
    "  damselfly mount 127.0.0.1:5000/app:lazy /mnt/app --agent http://127.0.0.1:65003 --output-json"
)
UMOUNT_EPILOG = "Examples:\n\n  damselfly umount /mnt/python\n\n  damselfly umount /mnt/python --lazy"

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="Mount config: Damselfly's (YAML/JSON) or a nydusd config.json.", show_default=False),
]
MirrorOpt = Annotated[
    str | None,
    typer.Option(
        "--mirror",
        envvar="DAMSELFLY_MIRROR",
        help="The node's registry-proxy, tried before the registry (default: straight to the registry).",
        show_default=False,
    ),
]
InsecureOpt = Annotated[bool, typer.Option("--insecure", help="The registry speaks plain HTTP or unverified TLS.")]
PlatformOpt = Annotated[str, typer.Option("--platform", help="OS/ARCH\\[/VARIANT] to pick from an index.")]


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one error line and return the Exit to raise."""
    err.print(Text.assemble(("error: ", "bold red"), " ".join(message.split())), soft_wrap=True)
    return typer.Exit(code)


def effective_config(config: Path | None, mirror: str | None, insecure: bool) -> MountConfig:
    """The config file (or the defaults) with the shortcuts applied."""
    return load_mount_config(config).with_shortcuts(mirror=mirror, insecure=insecure)


def mount_here(
    image: str, mountpoint: Path, config: MountConfig, *, platform: str = "linux/amd64", owner: str = "cli"
) -> StartedMount:
    """Start a daemon of our own for the mount and wait until it is ready."""
    spec = MountSpec(image=image, mountpoint=mountpoint, config=config, platform=platform, owner=owner)
    return start_daemon(spec, log_path=spec.run_dir / "logs" / f"{spec.id}.log")


def mount_through_agent(agent: str, image: str, mountpoint: Path, config: MountConfig) -> dict[str, Any]:
    """Ask the node agent to mount; its answer (the mount's description)."""
    body = {"image": image, "mountpoint": str(mountpoint.absolute()), "config": config.model_dump(mode="json")}
    request = urllib.request.Request(
        f"{agent.rstrip('/')}/api/v1/mounts",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=180) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        try:
            message = json.loads(text).get("message") or text
        except ValueError:
            message = text
        raise UpstreamError(f"agent {agent}: {message}") from None
    except OSError as exc:
        raise DependencyUnavailable(f"agent {agent} unreachable: {exc}") from exc


def mount(
    image: Annotated[str, typer.Argument(help="A converted image: HOST[:PORT]/REPO[:TAG|@DIGEST].")],
    mountpoint: Annotated[Path, typer.Argument(help="An existing directory to mount it on.")],
    config: ConfigOpt = None,
    mirror: MirrorOpt = None,
    insecure: InsecureOpt = False,
    platform: PlatformOpt = "linux/amd64",
    agent: Annotated[
        str | None,
        typer.Option(
            "--agent", envvar="DAMSELFLY_AGENT", help="Let this node agent serve the mount.", show_default=False
        ),
    ] = None,
    output_json: Annotated[bool, typer.Option("--output-json", help="Print the result as JSON.")] = False,
) -> None:
    """Mount a converted image lazily at MOUNTPOINT; returns once it is ready, a daemon serves it."""
    try:
        settings = effective_config(config, mirror, insecure)
        if agent:
            result = mount_through_agent(agent, image, mountpoint, settings)
        else:
            started = mount_here(image, mountpoint, settings, platform=platform)
            result = {
                "id": started.spec.id,
                "image": image,
                "digest": started.digest,
                "mountpoint": str(started.spec.mountpoint),
                "pid": started.pid,
                "ready_seconds": round(started.ready_seconds, 3),
                "log": str(started.log_path),
            }
    except DamselflyError as exc:
        raise fail(exc.message) from None
    if output_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(f"mounted {image} ({result.get('digest')}) at {result.get('mountpoint')}")


def umount(
    mountpoint: Annotated[Path, typer.Argument(help="Where a lazy image is mounted.")],
    lazy: Annotated[bool, typer.Option("--lazy", "-l", help="Detach now even if busy (like umount -l).")] = False,
) -> None:
    """Unmount a lazy mount and end its daemon."""
    try:
        stop_mount(mountpoint, lazy=lazy)
    except DamselflyError as exc:
        raise fail(exc.message) from None
    typer.echo(f"unmounted {os.path.abspath(mountpoint)}")
