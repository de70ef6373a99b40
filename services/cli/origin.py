"""A local origin registry for the demo and the benchmarks: Debian's docker-registry (distribution v2)."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import yaml

from shared.errors import DependencyUnavailable, UpstreamError
from shared.nats_server import _die_with_parent
from shared.netutil import free_port, wait_for_port

# A combined-format access line of a blob GET that sent bytes: "GET /v2/<name>/blobs/<digest> HTTP/1.1" 200 N
_BLOB_GET = re.compile(r'"GET /v2/\S+/blobs/(sha256:[0-9a-f]{64})\S* HTTP/[0-9.]+" (?:200|206) (\d+)')


class LocalOrigin:
    """A docker-registry on a free loopback port, its storage and logs in ``workdir``."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The registry's base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        """host:port, as image references name it."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> LocalOrigin:
        """Write its config and start it."""
        binary = shutil.which("docker-registry")
        if binary is None:
            raise DependencyUnavailable("docker-registry not found: run `make setup` (Debian package docker-registry)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(self.workdir / "storage")}, "delete": {"enabled": True}},
            "http": {"addr": f"127.0.0.1:{self.port}", "secret": "damselfly-local-origin"},
        }
        config_path = self.workdir / "config.yml"
        config_path.write_text(yaml.safe_dump(config))
        with (self.workdir / "access.log").open("ab") as stdout, (self.workdir / "registry.log").open("ab") as stderr:
            self.process = subprocess.Popen(
                [binary, "serve", str(config_path)], stdout=stdout, stderr=stderr, preexec_fn=_die_with_parent
            )
        if not wait_for_port("127.0.0.1", self.port, 15):
            self.stop()
            raise DependencyUnavailable(f"docker-registry did not start; see {self.workdir / 'registry.log'}")
        return self

    def push_layout(self, layout: Path, tag: str, repository: str) -> str:
        """Copy an OCI layout's image into this registry with skopeo; returns the reference."""
        reference = f"{self.host}/{repository}"
        result = subprocess.run(
            [
                "skopeo",
                "--insecure-policy",
                "copy",
                "--quiet",
                "--preserve-digests",
                "--dest-tls-verify=false",
                f"oci:{layout}:{tag}",
                f"docker://{reference}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise UpstreamError(f"skopeo could not push {layout}:{tag}: {result.stderr.strip()}")
        return reference

    def catalog(self) -> bytes:
        """The registry's repository catalogue (a readiness probe that touches storage)."""
        with urllib.request.urlopen(f"{self.url}/v2/_catalog", timeout=5) as response:
            return bytes(response.read())

    def blob_bytes_served(self) -> dict[str, int]:
        """Bytes of each blob the registry has sent so far, from its access log."""
        served: dict[str, int] = {}
        log = self.workdir / "access.log"
        if log.exists():
            for match in _BLOB_GET.finditer(log.read_text(errors="replace")):
                served[match.group(1)] = served.get(match.group(1), 0) + int(match.group(2))
        return served

    def stop(self) -> None:
        """Stop the registry."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
