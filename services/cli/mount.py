"""``damselfly mount IMAGE MOUNTPOINT`` and ``damselfly umount MOUNTPOINT``: lazy mounts, like nydusd.

``mount`` returns once the mount is ready; a background daemon serves it (its own, or the node agent's
with ``--agent``).  ``umount`` unmounts and waits for that daemon to exit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from services.chunk_fuse.documents import read_config_document
from services.chunk_fuse.mount_config import MountConfig, load_mount_config
from services.chunk_fuse.records import MountSpec
from services.chunk_fuse.spawn import StartedMount, start_daemon, stop_mount
from services.cli.agent_client import create_mount
from services.cli.options import ConfigOpt, InsecureOpt, MirrorOpt, PlatformOpt, fail
from shared.errors import DamselflyError

MOUNT_EPILOG = (
    "Examples:\n\n"
    "  damselfly mount 127.0.0.1:5000/library/python:3.11-lazy /mnt/python --insecure\n\n"
    "  damselfly mount registry.example.com/app:v2-lazy /mnt/app --mirror http://127.0.0.1:65001\n\n"
    "  damselfly mount 127.0.0.1:5000/app:lazy /mnt/app --config /etc/nydus/nydusd-config.json --insecure\n\n"
    "  damselfly mount 127.0.0.1:5000/app:lazy /mnt/app --agent http://127.0.0.1:65003 --output-json"
)
UMOUNT_EPILOG = "Examples:\n\n  damselfly umount /mnt/python\n\n  damselfly umount /mnt/python --lazy"


def effective_config(config: Path | None, mirror: str | None, insecure: bool) -> MountConfig:
    """The config file (or the defaults) with the shortcuts applied."""
    return load_mount_config(config).with_shortcuts(mirror=mirror, insecure=insecure)


def mount_here(
    image: str, mountpoint: Path, config: MountConfig, *, platform: str = "linux/amd64", owner: str = "cli"
) -> StartedMount:
    """Start a daemon of our own for the mount and wait until it is ready."""
    spec = MountSpec(image=image, mountpoint=mountpoint, config=config, platform=platform, owner=owner)
    return start_daemon(spec, log_path=spec.run_dir / "logs" / f"{spec.id}.log")


def mount_through_agent(
    agent: str, image: str, mountpoint: Path, config: Path | None, mirror: str | None, insecure: bool, platform: str
) -> dict[str, Any]:
    """Ask the node agent to mount; its answer (the mount's description).

    The config file goes as written: the agent validates it, and what it leaves out (the mirror, the
    chunk cache) the node decides.
    """
    document = read_config_document(config) if config is not None else None
    return create_mount(
        agent,
        image,
        str(mountpoint.absolute()),
        config=document,
        mirror=mirror,
        insecure=insecure,
        platform=platform,
    )


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
        if agent:
            result = mount_through_agent(agent, image, mountpoint, config, mirror, insecure, platform)
        else:
            settings = effective_config(config, mirror, insecure)
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
