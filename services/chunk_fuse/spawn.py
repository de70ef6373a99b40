"""Starting and ending mount daemons, for the CLI and the agent alike."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from services.chunk_fuse.records import MountRecord, MountSpec, find_record
from services.chunk_fuse.rundir import is_mounted
from shared.errors import DamselflyError, DependencyUnavailable, InvalidRequest, NotFound

#: How long a daemon may take from start to a ready mount (bootstrap download included).
DEFAULT_READY_TIMEOUT = 120.0


class MountFailed(DamselflyError):
    """The mount daemon could not mount the image."""

    http_status = 502
    code = "mount_failed"


@dataclass
class StartedMount:
    """A daemon whose mount is ready."""

    spec: MountSpec
    pid: int
    digest: str
    ready_seconds: float
    metadata_seconds: float
    image_config: dict[str, Any]
    log_path: Path | None
    process: subprocess.Popen[bytes]


def _log_tail(path: Path | None, lines: int = 8) -> str:
    if path is None:
        return ""
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


@dataclass
class Standby:
    """A daemon started ahead of need: its imports are done, it waits on stdin for a mount spec.

    Most of a mount's start-up is Python importing the daemon (aiohttp, pydantic, mfusepy); a node agent
    keeps one standby so a mount costs only the image's metadata and FUSE's INIT.
    """

    process: subprocess.Popen[bytes]
    ready_read_fd: int
    log_path: Path | None
    warm: bool = False  # Its imports are done (it said so on the readiness pipe).

    @property
    def alive(self) -> bool:
        """Whether it still waits."""
        return self.process.poll() is None

    def poll_warm(self, timeout: float = 0.0) -> bool:
        """Whether its imports are done, waiting up to ``timeout`` seconds for it to say so."""
        if not self.warm and self.alive and (timeout > 0 or _readable(self.ready_read_fd)):
            # The line is written in one piece, so once the pipe is readable it is all there.
            line = _read_line(self.ready_read_fd, max(timeout, 1.0))
            self.warm = bool(line) and '"standby"' in (line or "")
        return self.warm

    def release(self) -> None:
        """End it unused (it exits at EOF on stdin)."""
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(OSError):
            os.close(self.ready_read_fd)


def _spawn(args: list[str], log_path: Path | None, *, stdin: int) -> tuple[subprocess.Popen[bytes], int]:
    """A daemon process and the read end of its readiness pipe."""
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    read_fd, write_fd = os.pipe()
    log: IO[bytes] | int = log_path.open("ab") if log_path is not None else subprocess.DEVNULL
    command = [sys.executable, "-m", "services.chunk_fuse.daemon", *args, "--ready-fd", str(write_fd)]
    if log_path is not None:
        command += ["--log-file", str(log_path)]
    try:
        process = subprocess.Popen(
            command,
            pass_fds=(write_fd,),
            stdin=stdin,
            stdout=log,
            stderr=log,
            # Its own session: the daemon outlives the command that started it, and a Ctrl-C in that
            # terminal does not reach it.
            start_new_session=True,
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
        if not isinstance(log, int):
            log.close()
    return process, read_fd


def start_standby(log_path: Path | None = None) -> Standby:
    """Start a standby daemon (returns at once; it imports in the background)."""
    process, read_fd = _spawn(["--standby"], log_path, stdin=subprocess.PIPE)
    return Standby(process=process, ready_read_fd=read_fd, log_path=log_path)


def start_daemon(
    spec: MountSpec,
    *,
    log_path: Path | None = None,
    timeout: float = DEFAULT_READY_TIMEOUT,
    standby: Standby | None = None,
) -> StartedMount:
    """Start a daemon for ``spec`` (or hand it to ``standby``) and wait until its mount is ready.

    MountFailed with its reason if it is not. A standby's log file is the mount's log.
    """
    mountpoint = Path(os.path.abspath(spec.mountpoint))
    if not mountpoint.is_dir():
        raise InvalidRequest(f"mount point {mountpoint} is not a directory")
    if is_mounted(mountpoint):
        raise InvalidRequest(f"{mountpoint} is already a mount point")
    spec = spec.model_copy(update={"mountpoint": mountpoint})
    spec_path = spec.run_dir / "specs" / f"{spec.id}.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(spec.model_dump_json())
    process: subprocess.Popen[bytes] | None = None
    if standby is not None and standby.alive and standby.process.stdin is not None:
        # Its "imports done" line comes first on the pipe; the mount's line is the next one.
        standby.poll_warm(timeout)
        try:
            standby.process.stdin.write(f"{spec_path}\n".encode())
            standby.process.stdin.close()
            process, read_fd, log_path = standby.process, standby.ready_read_fd, standby.log_path
        except OSError:  # It died between the check and the write: start one the usual way.
            standby.release()
    if process is None:
        process, read_fd = _spawn(["--spec", str(spec_path)], log_path, stdin=subprocess.DEVNULL)
    try:
        line = _read_line(read_fd, timeout)
    finally:
        os.close(read_fd)
    if line is None:
        _terminate(process, mountpoint)
        raise MountFailed(f"mount of {spec.image} at {mountpoint} not ready after {timeout:.0f}s")
    if not line:
        process.wait(10)
        tail = _log_tail(log_path)
        raise MountFailed(f"mount daemon exited with {process.returncode}" + (f":\n{tail}" if tail else ""))
    message = json.loads(line)
    if not message.get("ok"):
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        raise MountFailed(str(message.get("error") or "mount failed"))
    return StartedMount(
        spec=spec,
        pid=int(message["pid"]),
        digest=str(message["digest"]),
        ready_seconds=float(message["ready_seconds"]),
        metadata_seconds=float(message["metadata_seconds"]),
        image_config=dict(message.get("config") or {}),
        log_path=log_path,
        process=process,
    )


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def _read_line(fd: int, timeout: float) -> str | None:
    """One line from the pipe: the line, '' at EOF without one, None on timeout."""
    deadline = time.monotonic() + timeout
    buffer = b""
    while b"\n" not in buffer:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        block = os.read(fd, 65536)
        if not block:
            break
        buffer += block
    return buffer.split(b"\n", 1)[0].decode(errors="replace")


def _terminate(process: subprocess.Popen[bytes] | None, mountpoint: Path, pid: int | None = None) -> None:
    """End a daemon that will not end by itself, and make sure its mount is gone."""
    target = pid if pid is not None else (process.pid if process is not None else None)
    if target is not None:
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, sig)
            if _wait_pid(target, process, wait):
                break
    if is_mounted(mountpoint):
        fusermount(mountpoint, lazy=True)


def _wait_pid(pid: int, process: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None:
            if process.poll() is not None:
                return True
        else:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
        time.sleep(0.02)
    return False


def fusermount(mountpoint: Path, *, lazy: bool = False) -> subprocess.CompletedProcess[str]:
    """``fusermount3 -u [-z] MOUNTPOINT``."""
    command = ["fusermount3", "-u", *(["-z"] if lazy else []), str(mountpoint)]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def stop_mount(
    mountpoint: Path,
    *,
    record: MountRecord | None = None,
    process: subprocess.Popen[bytes] | None = None,
    lazy: bool = False,
    timeout: float = 10.0,
) -> None:
    """Unmount and wait for the daemon to exit (it exits by itself once unmounted).

    A busy mount fails with InvalidRequest unless ``lazy`` (then it is detached now and goes away when
    its last user does).  A daemon that does not exit in ``timeout`` is terminated.
    """
    mountpoint = Path(os.path.abspath(mountpoint))
    record = record or find_record(mountpoint)
    if record is None and not is_mounted(mountpoint):
        raise NotFound(f"nothing is mounted at {mountpoint}")
    unmount(mountpoint, lazy=lazy)
    if record is not None or process is not None:
        wait_for_daemon(mountpoint, record.pid if record is not None else None, process, timeout)


def unmount(mountpoint: Path, *, lazy: bool = False) -> None:
    """Take the mount off ``mountpoint`` (its daemon then exits by itself); nothing there is no error."""
    if is_mounted(mountpoint):
        result = fusermount(mountpoint)
        if result.returncode != 0:
            if not lazy:
                raise InvalidRequest(f"cannot unmount {mountpoint}: {result.stderr.strip() or 'busy'}")
            result = fusermount(mountpoint, lazy=True)
            if result.returncode != 0:
                raise DependencyUnavailable(f"cannot unmount {mountpoint}: {result.stderr.strip()}")


def wait_for_daemon(
    mountpoint: Path, pid: int | None, process: subprocess.Popen[bytes] | None, timeout: float = 10.0
) -> None:
    """Wait for an unmounted mount's daemon to exit; terminate it after ``timeout``."""
    target = pid if pid is not None else (process.pid if process is not None else 0)
    if not _wait_pid(target, process, timeout):
        _terminate(process, mountpoint, pid)
