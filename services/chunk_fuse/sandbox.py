"""Run a command in a lazily mounted image: ``python -m services.chunk_fuse.sandbox SPEC_JSON``.

In a new mount namespace (so every mount below dies with the command, whatever happens): a tmpfs for the
writable layer, an overlayfs of that layer over the read-only FUSE mount, ``/proc`` and ``/dev`` inside it;
then chroot, the working directory, the user and groups, and exec of the command with the image's
environment.  This process becomes the command (exec), so its exit status and output are the command's.

Standard library only and no imports of the rest of the project: it starts in a few tens of ms.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path
from typing import Any

CLONE_NEWNS = 0x00020000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

#: Exit status when the command cannot be started (as runc and shells use them).
EXIT_CANNOT_RUN = 126
EXIT_NOT_FOUND = 127
EXIT_SETUP_FAILED = 125


def _load_libc() -> ctypes.CDLL:
    # glibc's soname first: find_library runs ldconfig in a subprocess, which a container start pays for.
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        from ctypes.util import find_library

        return ctypes.CDLL(find_library("c") or "libc.so.6", use_errno=True)


_libc = _load_libc()


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {fstype or 'bind'} {source} on {target}",
    )


MNT_DETACH = 2


def bind_mount(source: Path | str, target: Path | str) -> None:
    """Bind ``source`` (a mount) onto ``target``: one more place the same file system is seen."""
    _mount(str(source), str(target), None, MS_BIND)


def detach(target: Path | str) -> None:
    """Lazily take the mount off ``target`` (``umount -l``); the file system lives on where else it is mounted."""
    _check(_libc.umount2(str(target).encode(), MNT_DETACH), f"umount {target}")


def _escape_option(path: str) -> str:
    # overlayfs splits its options on ',' and lowerdir lists on ':'.
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def prepare_root(spec: dict[str, Any]) -> str:
    """Set up the namespace and the overlay root; returns the root's path."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # Nothing mounted from here on may leak back to the host's namespace.
    _mount("none", "/", None, MS_REC | MS_PRIVATE)
    state = spec["state_dir"]
    rw = os.path.join(state, "rw")
    merged = os.path.join(state, "merged")
    _mount("tmpfs", rw, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    upper, work = os.path.join(rw, "upper"), os.path.join(rw, "work")
    os.mkdir(upper, 0o755)
    os.mkdir(work, 0o755)
    options = (
        f"lowerdir={_escape_option(spec['lower'])},upperdir={_escape_option(upper)},workdir={_escape_option(work)}"
    )
    _mount("overlay", merged, "overlay", 0, options)
    proc = os.path.join(merged, "proc")
    os.makedirs(proc, exist_ok=True)
    try:
        _mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:
        # Some sandboxes forbid a fresh procfs outside a PID namespace; the host's view will do.
        _mount("/proc", proc, None, MS_BIND | MS_REC)
    dev = os.path.join(merged, "dev")
    os.makedirs(dev, exist_ok=True)
    _mount("/dev", dev, None, MS_BIND | MS_REC)
    return merged


def enter(spec: dict[str, Any], root: str) -> None:
    """chroot, cd, and become the image's user."""
    os.chroot(root)
    os.chdir("/")
    try:
        os.chdir(spec.get("cwd") or "/")
    except OSError as exc:
        raise OSError(exc.errno, f"working directory {spec.get('cwd')}: {exc.strerror}") from None
    uid, gid = int(spec.get("uid", 0)), int(spec.get("gid", 0))
    os.setgroups([int(g) for g in spec.get("groups", [])])
    os.setgid(gid)
    os.setuid(uid)


def main(argv: list[str] | None = None) -> int:
    """Set up, then exec the command (only returns on failure)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m services.chunk_fuse.sandbox SPEC_JSON", file=sys.stderr)
        return EXIT_SETUP_FAILED
    spec = json.loads(args[0])
    command: list[str] = spec["argv"]
    env: dict[str, str] = spec["env"]
    try:
        root = prepare_root(spec)
        enter(spec, root)
    except OSError as exc:
        print(f"damselfly run: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    try:
        os.execvpe(command[0], command, env)
    except FileNotFoundError:
        print(f"damselfly run: {command[0]}: command not found in the image", file=sys.stderr)
        return EXIT_NOT_FOUND
    except OSError as exc:
        print(f"damselfly run: {command[0]}: {exc.strerror}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    return EXIT_CANNOT_RUN  # pragma: no cover - execvpe does not return


if __name__ == "__main__":
    raise SystemExit(main())
