"""Running a command in a lazily mounted image, without the CLI framework: the path of every container start.

``damselfly run --agent`` goes from here straight to the node agent and the sandbox; importing typer,
rich and the config models would cost a container start more than its mount does (they are read from
disk, often from a cold page cache). Only the standard library and light project modules are imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

from services.chunk_fuse.documents import read_config_document
from services.chunk_fuse.rundir import is_mounted, new_mount_id, run_dir
from services.cli.agent_client import create_mount, delete_mount
from shared.errors import InvalidRequest

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ProcessUser(NamedTuple):
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
def forwarded_signals(pid: int) -> Iterator[None]:
    """While the command runs, Ctrl-C and SIGTERM are its business: pass them on, then clean up."""

    def forward(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

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
    from services.chunk_fuse import sandbox

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
    # A fork, not a new interpreter: the sandbox is a few syscalls before exec, and a second Python
    # start-up (read from disk) would cost a container start more than they do.
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child execs the command or exits
        code = sandbox.EXIT_SETUP_FAILED
        try:
            code = sandbox.main([json.dumps(spec)])
        finally:
            os._exit(code)
    with forwarded_signals(pid):
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries, but be safe
                continue
            except KeyboardInterrupt:  # pragma: no cover - the handler above normally takes SIGINT
                continue
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def make_state_dir(state_dir: Path) -> None:
    """The run's directories: the lazy mount (lower), the writable layer (rw) and the overlay (merged)."""
    for sub in ("lower", "rw", "merged"):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)


def remove_state_dir(state_dir: Path) -> None:
    """Remove a finished run's directories: empty ones with rmdir, anything left in them with rmtree.

    Normally they are empty (the writable layer was a tmpfs in the run's own mount namespace), and importing
    shutil would read zlib, bz2 and lzma from disk at the end of every container start."""
    try:
        for sub in ("lower", "rw", "merged"):
            with contextlib.suppress(FileNotFoundError):
                (state_dir / sub).rmdir()
        state_dir.rmdir()
    except OSError:
        import shutil

        shutil.rmtree(state_dir, ignore_errors=True)


def new_state_dir() -> Path:
    """A fresh directory for one run, under this machine's run dir."""
    return run_dir() / "run" / new_mount_id()


def run_through_agent(
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
    Returns the command's exit status; DamselflyError when the run cannot start.
    """
    lower = state_dir / "lower"
    mount_id: str | None = None
    try:
        document = read_config_document(config) if config is not None else None
        make_state_dir(state_dir)
        mounted = create_mount(
            agent, image, str(lower), config=document, mirror=mirror, insecure=insecure, platform=platform
        )
        mount_id = str(mounted["id"])
        return run_in_image(lower, dict(mounted.get("image_config") or {}), state_dir, command)
    finally:
        if mount_id is not None:
            with contextlib.suppress(Exception):
                delete_mount(agent, mount_id, lazy=True)
        if not is_mounted(lower):
            remove_state_dir(state_dir)


class RunArgs(NamedTuple):
    """``damselfly run``'s arguments."""

    image: str
    command: list[str]
    config: Path | None = None
    mirror: str | None = None
    insecure: bool = False
    platform: str = "linux/amd64"
    agent: str | None = None


_VALUE_OPTIONS = {"--config": "config", "--mirror": "mirror", "--platform": "platform", "--agent": "agent"}


def parse_fast(argv: Sequence[str], environ: Mapping[str, str]) -> RunArgs | None:
    """The arguments of an ordinary ``damselfly run``; None for anything else (help, a typo, ``--opt=value``).

    The full command line (services/cli/run.py) handles what this leaves; a test checks that both read
    every ordinary command line alike.
    """
    values: dict[str, Any] = {"mirror": environ.get("DAMSELFLY_MIRROR"), "agent": environ.get("DAMSELFLY_AGENT")}
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--insecure":
            values["insecure"] = True
            index += 1
        elif arg in _VALUE_OPTIONS and index + 1 < len(argv):
            values[_VALUE_OPTIONS[arg]] = argv[index + 1]
            index += 2
        elif arg.startswith("-"):
            return None
        else:
            break
    if index >= len(argv):
        return None
    command = list(argv[index + 1 :])
    if command[:1] == ["--"]:
        command = command[1:]
    if values.get("config") is not None:
        values["config"] = Path(values["config"])
    return RunArgs(image=argv[index], command=command, **{k: v for k, v in values.items() if v is not None})


def main_fast(argv: Sequence[str]) -> int | None:
    """``damselfly run`` through a node agent, without the CLI framework; None when it is not that."""
    args = parse_fast(argv, os.environ)
    if args is None or not args.agent:
        return None
    if os.geteuid() != 0:
        return None  # The full CLI says why it cannot run.
    from shared.errors import DamselflyError

    try:
        return run_through_agent(
            args.agent,
            args.image,
            args.config,
            args.mirror,
            args.insecure,
            args.platform,
            new_state_dir(),
            args.command,
        )
    except DamselflyError as exc:
        print(f"error: {' '.join(exc.message.split())}", file=sys.stderr)
        return 1
