"""A private containerd for tests: root, state, socket and the opt plugin in a temp dir, CRI disabled."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def containerd(workdir: Path) -> Iterator[Path]:
    """Run containerd until the block ends; yields its socket path."""
    binary = shutil.which("containerd")
    if binary is None:
        raise FileNotFoundError("containerd is not installed: run `make setup` (Debian package containerd)")
    workdir.mkdir(parents=True, exist_ok=True)
    # A unix socket path may be at most ~104 bytes, and pytest's temp dirs (with xdist's worker names)
    # are longer than that: the socket lives in a short directory of its own.
    socket_dir = Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))
    socket = socket_dir / "c.sock"
    config = workdir / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{workdir / "root"}"\n'
        f'state = "{workdir / "state"}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{socket}"\n'
        f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{workdir / "opt"}"\n'
    )
    with (workdir / "containerd.log").open("wb") as log:
        process = subprocess.Popen([binary, "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not socket.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start: {(workdir / 'containerd.log').read_text()[-2000:]}")
            time.sleep(0.05)
        yield socket
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        # Snapshots may leave mounts under root; unmount before the temp dir goes.
        subprocess.run(["sh", "-c", f"grep -o ' {workdir}[^ ]*' /proc/mounts | xargs -r -n1 umount -l"], check=False)
        shutil.rmtree(socket_dir, ignore_errors=True)


def hosts_dir(directory: Path, origin_host: str, mirror_url: str) -> Path:
    """A containerd ``--hosts-dir`` that sends pulls of ``origin_host`` to ``mirror_url`` first."""
    host_dir = directory / origin_host
    host_dir.mkdir(parents=True, exist_ok=True)
    (host_dir / "hosts.toml").write_text(
        f'server = "http://{origin_host}"\n\n[host."{mirror_url}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    return directory


def ctr(socket: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``ctr`` against the test's containerd."""
    command: Sequence[str] = ["ctr", "--address", str(socket), *args]
    return subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, check=False)
