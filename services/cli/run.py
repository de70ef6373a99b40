"""``damselfly run [--mirror URL] [--insecure] [--config FILE] IMAGE [--] CMD...``: a container on a lazy mount.

The image is mounted lazily (a daemon of our own), a sandbox process puts a writable overlay on top in a
new mount namespace and execs the command there, chrooted, with the image's Env, WorkingDir and User.  Its
exit status and output are the command's.  Whatever happens (the command fails, Ctrl-C, SIGTERM) the
overlay dies with the namespace and the lazy mount is unmounted before ``run`` returns.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Annotated

import typer

# Light imports only (see services/cli/entry.py); the mount daemon's machinery is imported where a mount
# of our own is made.
from services.chunk_fuse.rundir import is_mounted
from services.cli.container import (
    make_state_dir,
    new_state_dir,
    run_in_image,
    run_through_agent,
)
from services.cli.options import ConfigOpt, InsecureOpt, MirrorOpt, PlatformOpt, fail
from shared.errors import DamselflyError

RUN_EPILOG = (
    "Examples:\n\n"
    "  damselfly run --insecure 127.0.0.1:5000/library/python:3.11-lazy -- python3 -V\n\n"
    "  damselfly run --mirror http://127.0.0.1:65001 registry.example.com/app:v2-lazy\n\n"
    "  damselfly run --config nydusd-config.json --insecure 127.0.0.1:5000/app:lazy -- sh -c 'id; pwd'"
)


def run(
    image: Annotated[str, typer.Argument(help="A converted image: HOST[:PORT]/REPO[:TAG|@DIGEST].")],
    cmd: Annotated[
        list[str] | None, typer.Argument(help="The command and its arguments (default: the image's).")
    ] = None,
    config: ConfigOpt = None,
    mirror: MirrorOpt = None,
    insecure: InsecureOpt = False,
    platform: PlatformOpt = "linux/amd64",
    agent: Annotated[
        str | None,
        typer.Option(
            "--agent",
            envvar="DAMSELFLY_AGENT",
            help="Let this node agent serve the mount (its warm daemon starts at once).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run a command in a lazily mounted image (writable overlay, own mount namespace, chroot)."""
    command = list(cmd or [])
    if command[:1] == ["--"]:
        # Options stop at IMAGE, so a "--" after it arrives here verbatim.
        command = command[1:]
    if os.geteuid() != 0:
        raise fail("damselfly run needs root (mount namespaces, overlayfs, chroot)")
    state_dir = new_state_dir()
    lower = state_dir / "lower"
    if agent:
        try:
            code = run_through_agent(agent, image, config, mirror, insecure, platform, state_dir, command)
        except DamselflyError as exc:
            raise fail(exc.message) from None
        raise typer.Exit(code)

    from services.chunk_fuse.spawn import StartedMount, stop_mount
    from services.cli.mount import effective_config, mount_here

    try:
        settings = effective_config(config, mirror, insecure)
    except DamselflyError as exc:
        raise fail(exc.message) from None
    make_state_dir(state_dir)
    started: StartedMount | None = None
    code = 1
    try:
        started = mount_here(image, lower, settings, platform=platform, owner="run")
        code = run_in_image(lower, started.image_config, state_dir, command)
    except DamselflyError as exc:
        raise fail(exc.message) from None
    finally:
        # Lazy: a process the command left behind may still hold the namespace (and so the mount).
        if started is not None or is_mounted(lower):
            with contextlib.suppress(DamselflyError):
                stop_mount(lower, process=started.process if started else None, lazy=True)
        # Never recurse into a mount that is somehow still there: that would walk the image.
        if not is_mounted(lower):
            shutil.rmtree(state_dir, ignore_errors=True)
        if started is not None and started.log_path is not None and code == 0:
            started.log_path.unlink(missing_ok=True)
    raise typer.Exit(code)


def run_command(args: list[str]) -> None:
    """``damselfly run ARGS`` as a one-command CLI (the same options, help and exit codes)."""
    app = typer.Typer(add_completion=False)
    app.command(
        epilog=RUN_EPILOG,
        context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True},
    )(run)
    app(args=args, prog_name="damselfly run")
