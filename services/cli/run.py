"""``damselfly run [--mirror URL] [--insecure] [--config FILE] IMAGE [--] CMD...``: a container on a lazy mount.

The image is mounted lazily (a daemon of our own), a sandbox process puts a writable overlay on top in a
new mount namespace and execs the command there, chrooted, with the image's Env, WorkingDir and User.  Its
exit status and output are the command's.  Whatever happens (the command fails, Ctrl-C, SIGTERM) the
overlay dies with the namespace and the lazy mount is unmounted before ``run`` returns.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

# Light imports only: this module is on the path of every container start (see services/cli/entry.py).
# The mount daemon's machinery is imported where a mount of our own is made.
from services.chunk_fuse.documents import read_config_document
from services.chunk_fuse.rundir import is_mounted, new_mount_id, run_dir
from services.cli.agent_client import create_mount, delete_mount
from services.cli.options import ConfigOpt, InsecureOpt, MirrorOpt, PlatformOpt, fail
from shared.errors import DamselflyError, InvalidRequest

RUN_EPILOG = (
    "Examples:\n\n"
    "  damselfly run --insecure 127.0.0.1:5000/library/python:3.11-lazy -- python3 -V\n\n"
    "  damselfly run --mirror http://127.0.0.1:65001 registry.example.com/app:v2-lazy\n\n"
    "  damselfly run --config nydusd-config.json --insecure 127.0.0.1:5000/app:lazy -- sh -c 'id; pwd'"
)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class ProcessUser:
    """Who the command runs as."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


def _table(path: Path) -> list[list[str]]:
    try:
        return [line.split(":") for line in path.read_text(errors="replace").splitlines() if line and line[0] != "#"]
    except OSError:
        return []


def resolve_user(root: Path, user: str) -> ProcessUser:
    """The image's ``User`` (``name``, ``uid``, ``name:group``, ``uid:gid``) via its /etc/passwd and /etc/group."""
    name, _, group = (user or "").partition(":")
    passwd = _table(root / "etc" / "passwd")
    groups = _table(root / "etc" / "group")
    uid, gid, home, login = 0, 0, "/", "root"
    if name:
        entry = next((e for e in passwd if len(e) >= 6 and (e[0] == name or e[2] == name)), None)
        if entry is not None:
            login, uid, gid, home = entry[0], int(entry[2]), int(entry[3]), entry[5] or "/"
        elif name.isdigit():
            uid, gid, login = int(name), int(name), ""
        else:
            raise InvalidRequest(f"user {name!r} is not in the image's /etc/passwd")
    if group:
        found = next((e for e in groups if len(e) >= 3 and (e[0] == group or e[2] == group)), None)
        if found is not None:
            gid = int(found[2])
        elif group.isdigit():
            gid = int(group)
        else:
            raise InvalidRequest(f"group {group!r} is not in the image's /etc/group")
    supplementary = sorted(
        {int(e[2]) for e in groups if len(e) >= 4 and login and login in e[3].split(",") and e[2].isdigit()} | {gid}
    )
    return ProcessUser(uid, gid, tuple(supplementary), home)


def command_line(image_config: dict[str, Any], cmd: Sequence[str]) -> list[str]:
    """Docker's rule: Entrypoint stays, CMD replaces the image's Cmd."""
    entrypoint = list(image_config.get("Entrypoint") or [])
    args = list(cmd) if cmd else list(image_config.get("Cmd") or [])
    argv = entrypoint + args
    if not argv:
        raise InvalidRequest("no command given and the image has no Cmd or Entrypoint")
    return argv


def environment(image_config: dict[str, Any], user: ProcessUser) -> dict[str, str]:
    """The image's Env, with PATH and HOME filled in as runtimes do when it lacks them."""
    env: dict[str, str] = {}
    for item in image_config.get("Env") or []:
        key, _, value = str(item).partition("=")
        env[key] = value
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOME", user.home)
    return env


@contextlib.contextmanager
def _forwarded_signals(child: subprocess.Popen[bytes]) -> Iterator[None]:
    """While the command runs, Ctrl-C and SIGTERM are its business: pass them on, then clean up."""

    def forward(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_in_image(lower: Path, config: dict[str, Any], state_dir: Path, cmd: Sequence[str]) -> int:
    """Run ``cmd`` in the image mounted at ``lower`` (``config`` its runtime config); its exit status.

    A command killed by signal N gives 128+N.
    """
    user = resolve_user(lower, str(config.get("User") or ""))
    spec = {
        "lower": str(lower),
        "state_dir": str(state_dir),
        "argv": command_line(config, cmd),
        "env": environment(config, user),
        "cwd": str(config.get("WorkingDir") or "/"),
        "uid": user.uid,
        "gid": user.gid,
        "groups": list(user.groups),
    }
    child = subprocess.Popen([sys.executable, "-m", "services.chunk_fuse.sandbox", json.dumps(spec)])
    with _forwarded_signals(child):
        while True:
            try:
                status = child.wait()
                break
            except KeyboardInterrupt:  # pragma: no cover - the handler above normally takes SIGINT
                continue
    return 128 - status if status < 0 else status


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
    state_dir = run_dir() / "run" / new_mount_id()
    lower = state_dir / "lower"
    if agent:
        raise typer.Exit(_run_through_agent(agent, image, config, mirror, insecure, platform, state_dir, command))

    from services.chunk_fuse.spawn import StartedMount, stop_mount
    from services.cli.mount import effective_config, mount_here

    try:
        settings = effective_config(config, mirror, insecure)
    except DamselflyError as exc:
        raise fail(exc.message) from None
    _make_state_dir(state_dir)
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


def _make_state_dir(state_dir: Path) -> None:
    for sub in ("lower", "rw", "merged"):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)


def _run_through_agent(
    agent: str,
    image: str,
    config: Path | None,
    mirror: str | None,
    insecure: bool,
    platform: str,
    state_dir: Path,
    command: list[str],
) -> int:
    """The node agent mounts (from its warm standby daemon), the command runs, the agent unmounts.

    The config file goes to the agent as written; it validates it (a bad key comes back as the error).
    """
    lower = state_dir / "lower"
    mount_id: str | None = None
    try:
        document = read_config_document(config) if config is not None else None
        _make_state_dir(state_dir)
        mounted = create_mount(
            agent, image, str(lower), config=document, mirror=mirror, insecure=insecure, platform=platform
        )
        mount_id = str(mounted["id"])
        return run_in_image(lower, dict(mounted.get("image_config") or {}), state_dir, command)
    except DamselflyError as exc:
        raise fail(exc.message) from None
    finally:
        if mount_id is not None:
            with contextlib.suppress(DamselflyError):
                delete_mount(agent, mount_id, lazy=True)
        if not is_mounted(lower):
            shutil.rmtree(state_dir, ignore_errors=True)


def run_command(args: list[str]) -> None:
    """``damselfly run ARGS`` as a one-command CLI (the same options, help and exit codes)."""
    app = typer.Typer(add_completion=False)
    app.command(
        epilog=RUN_EPILOG,
        context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True},
    )(run)
    app(args=args, prog_name="damselfly run")
