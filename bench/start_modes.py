"""The start-up benchmark's measurements: one function per way of getting an image to run a command.

Every function runs real tools (containerd's ``ctr``, ``skopeo``, ``umoci``, ``chroot``, ``damselfly run``)
as subprocesses and returns a :class:`Timed` with the wall time and the command's first output line. The
origin's load is read from its access log (:class:`OriginLog`), a node's P2P intake from the growth of its
piece store on disk (:func:`tree_bytes`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.containerd import containerd, ctr

# A docker-registry access line: "GET /v2/... HTTP/1.1" 200 1234
_ACCESS = re.compile(r'"(GET|HEAD) (/v2/\S*) HTTP/[0-9.]+" (\d{3}) (\d+|-)')
# `damselfly` as installed (its console script, as a user types it), else the module.
_SCRIPT = Path(sys.executable).parent / "damselfly"
CLI = (str(_SCRIPT),) if _SCRIPT.is_file() else (sys.executable, "-m", "services.cli")


class BenchError(RuntimeError):
    """A measured command failed; the message carries its stderr."""


@dataclass
class Timed:
    """One measured run."""

    seconds: float
    output: str


def drop_caches() -> bool:
    """Write back and drop the page cache, dentries and inodes (root); False when not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def _check(result: subprocess.CompletedProcess[str], what: str) -> str:
    if result.returncode != 0:
        raise BenchError(f"{what} exited {result.returncode}: {result.stderr.strip()[-3000:]}")
    return result.stdout


def _run(command: Sequence[str], what: str, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        list(command), capture_output=True, text=True, timeout=timeout, check=False, env=env, stdin=subprocess.DEVNULL
    )
    return _check(result, what)


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


class OriginLog:
    """Bytes and requests the origin served since a mark, from its access log (one line per request)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def mark(self) -> None:
        """Start counting from now."""
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def usage(self) -> dict[str, int]:
        """Requests (GET and HEAD under /v2/) and bytes sent since the mark."""
        time.sleep(0.3)  # The registry writes its access line just after the response.
        with self.path.open("rb") as log:
            log.seek(self.offset)
            text = log.read().decode(errors="replace")
        requests = blob_requests = sent = 0
        for match in _ACCESS.finditer(text):
            requests += 1
            if "/blobs/" in match.group(2):
                blob_requests += 1
            if match.group(1) == "GET" and match.group(3) in ("200", "206") and match.group(4) != "-":
                sent += int(match.group(4))
        return {"origin_requests": requests, "origin_blob_requests": blob_requests, "origin_bytes": sent}


def tree_bytes(root: Path) -> int:
    """Bytes on disk of the regular files under ``root`` (a piece store's pieces, a chunk cache).

    Allocated blocks, not file sizes: a piece store's data file is sparse, its size the whole blob's
    from the first piece on.
    """
    total = 0
    if root.exists():
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink() and path.suffix not in (".db", ".db-wal", ".db-shm"):
                total += path.stat().st_blocks * 512
    return total


def image_config(layout: Path, tag: str) -> dict[str, Any]:
    """The ``config`` section of an OCI layout's image config."""
    index = json.loads((layout / "index.json").read_text())
    entry = next(
        (m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag),
        index["manifests"][0],
    )
    manifest = json.loads((layout / "blobs" / "sha256" / entry["digest"].split(":")[1]).read_text())
    config = json.loads((layout / "blobs" / "sha256" / manifest["config"]["digest"].split(":")[1]).read_text())
    return dict(config.get("config") or {})


def layout_tag(layout: Path) -> str:
    """The tag of the (first) image of an OCI layout."""
    index = json.loads((layout / "index.json").read_text())
    return str(index["manifests"][0].get("annotations", {}).get("org.opencontainers.image.ref.name", "latest"))


def chroot_env(config: dict[str, Any]) -> dict[str, str]:
    """The image's Env for a chroot (PATH and HOME filled in, as runtimes do)."""
    env = dict(str(item).partition("=")[::2] for item in config.get("Env") or [])
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.setdefault("HOME", "/root")
    return env


def chroot_run(rootfs: Path, cmd: Sequence[str], env: dict[str, str]) -> str:
    """The command in a plain chroot of an unpacked root filesystem."""
    return _run(["chroot", str(rootfs), *cmd], "chroot", env=env)


def umoci_unpack(layout: Path, tag: str, bundle: Path) -> Path:
    """``umoci unpack`` (as root: owners kept); returns the rootfs."""
    _run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)], "umoci unpack")
    return bundle / "rootfs"


def oci_skopeo_umoci(reference: str, work: Path, cmd: Sequence[str], env: dict[str, str]) -> Timed:
    """OCIv1 reference: ``skopeo copy`` the whole image, ``umoci unpack`` it, run the command in a chroot."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.monotonic()
    _run(
        ["skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false",
         f"docker://{reference}", f"oci:{work / 'layout'}:img"],
        "skopeo copy",
    )  # fmt: skip
    rootfs = umoci_unpack(work / "layout", "img", work / "bundle")
    output = chroot_run(rootfs, cmd, env)
    seconds = time.monotonic() - started
    shutil.rmtree(work, ignore_errors=True)
    return Timed(seconds, _first_line(output))


def oci_containerd(reference: str, work: Path, cmd: Sequence[str], name: str) -> Timed:
    """OCIv1: a fresh containerd (empty content store) pulls the image with no mirror and runs the command."""
    shutil.rmtree(work, ignore_errors=True)
    with containerd(work) as socket:
        drop_caches()
        started = time.monotonic()
        _check(ctr(socket, "images", "pull", "--plain-http", reference), "ctr images pull")
        output = _check(ctr(socket, "run", "--rm", reference, name, *cmd), "ctr run")
        seconds = time.monotonic() - started
    shutil.rmtree(work, ignore_errors=True)
    return Timed(seconds, _first_line(output))


def write_run_config(path: Path, cache_dir: Path, *, direct: bool = False) -> Path:
    """A ``damselfly run`` config whose chunk cache is ``cache_dir`` (so each mode picks its cache).

    ``direct``: no mirror at all, straight to the origin (a node agent would otherwise add its own proxy),
    and no learned prefetch list recorded or used: a lone lazy mount, with nothing of the cluster's.
    """
    document: dict[str, Any] = {"cache": {"work_dir": str(cache_dir)}}
    if direct:
        document["backend"] = {"mirrors": []}
        document["learned_prefetch"] = {"enable": False}
    path.write_text(json.dumps(document))
    return path


def damselfly_run_command(
    reference: str, config: Path, cmd: Sequence[str], mirror: str | None, agent: str | None = None
) -> list[str]:
    """The ``damselfly run`` command line of one lazy mode (through the node's agent when given)."""
    command = [*CLI, "run", "--insecure", "--config", str(config)]
    if mirror:
        command += ["--mirror", mirror]
    if agent:
        command += ["--agent", agent]
    return [*command, reference, "--", *cmd]


def wait_for_standby(agent: str, timeout: float = 120.0) -> int:
    """Wait until the node agent's standby daemon has its imports done (a node in its steady state).

    Returns the standby's pid: the process that will serve the next mount.
    """
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"{agent}/api/v1/mounts", timeout=10) as response:
            standby = json.loads(response.read())["standby"]
        if standby["ready"]:
            return int(standby["pid"])
        if time.monotonic() > deadline:
            raise RuntimeError(f"the agent at {agent} has no warm standby daemon after {timeout:.0f}s")
        time.sleep(0.05)


def drop_agent_memory(agent: str) -> int:
    """The node agent's mount daemons forget the chunks they hold in memory (drop_caches does not reach them):
    a kept image mount then reads from the disk chunk cache, as a fresh one would. How many were dropped."""
    request = urllib.request.Request(f"{agent}/api/v1/caches/drop", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(json.loads(response.read())["dropped_chunks"])


def run_env(run_dir: Path, pycache: Path | None) -> dict[str, str]:
    """The environment of ``damselfly run``: its own run dir, and a bytecode cache unless ``pycache`` is None.

    With ``PYTHONDONTWRITEBYTECODE`` set (as on this machine) every Python process of ``damselfly run`` (CLI,
    mount daemon, sandbox) would compile all it imports from source at every start; an installed
    application has its bytecode compiled once, which ``PYTHONPYCACHEPREFIX`` stands in for.
    """
    env = {**os.environ, "DAMSELFLY_RUN_DIR": str(run_dir)}
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def damselfly_run(
    reference: str,
    config: Path,
    cmd: Sequence[str],
    mirror: str | None,
    env: dict[str, str],
    prefix: Sequence[str] = (),
    agent: str | None = None,
) -> Timed:
    """``damselfly run`` of the converted image (through ``mirror`` when given), timed end to end."""
    command = [*prefix, *damselfly_run_command(reference, config, cmd, mirror, agent)]
    started = time.monotonic()
    output = _run(command, "damselfly run", env=env)
    return Timed(time.monotonic() - started, _first_line(output))


def python_start() -> Timed:
    """A reference, not a mode: the bare start of the interpreter ``damselfly run`` is written in (no site, no
    module of ours), what any Python run command pays before it does anything."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-S", "-c", "pass"], check=True, timeout=60)
    return Timed(time.monotonic() - started, "")


def opened_bytes(rootfs: Path, cmd: Sequence[str], env: dict[str, str], trace: Path) -> dict[str, int]:
    """Files (and their bytes) the command opens or execs, traced with strace in the unpacked chroot."""
    if shutil.which("strace") is None:
        return {}
    subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=openat,open,execve", "-o", str(trace), "chroot", str(rootfs), *cmd],
        capture_output=True,
        env=env,
        check=False,
        timeout=300,
    )
    paths: set[str] = set()
    for line in trace.read_text(errors="replace").splitlines():
        match = re.search(r'(?:openat\([^,]+, |open\(|execve\()"([^"]+)".*= (\d+|0)$', line)
        if match and not match.group(0).endswith("= -1"):
            paths.add(match.group(1))
    files = 0
    size = 0
    for name in paths:
        path = rootfs / name.lstrip("/")
        try:
            if path.is_file() and path.resolve().is_relative_to(rootfs.resolve()):
                files += 1
                size += path.stat().st_size
        except OSError:
            continue
    return {"files": files, "bytes": size}
