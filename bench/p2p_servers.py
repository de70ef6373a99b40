"""The servers the P2P benchmark runs beside the cluster: the origin, a pull-through cache and nginx.

The origin and the pull-through cache are Debian's docker-registry through the tests' own
:class:`~tests.support.registry.RegistryServer`, which captures the access log and parses it (with a
barrier request, so a line the registry writes just after the client has read the last byte is not
missed). nginx is started here with a throw-away config that serves one file with ``sendfile``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp

from shared.nats_server import _die_with_parent
from shared.netutil import free_port, wait_for_port
from tests.support.registry import RegistryServer, parse_access_line

MIB = 1024 * 1024
_WRITE_CHUNK = 8 * MIB
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"


@dataclass(frozen=True)
class Blob:
    """A blob pushed to the origin as the one layer of an image."""

    repository: str
    tag: str
    digest: str
    size: int

    def path(self) -> str:
        """``/v2/<name>/blobs/<digest>``, the same on the origin, the proxies and the cache."""
        return f"/v2/{self.repository}/blobs/{self.digest}"


def write_random_file(path: Path, size: int) -> str:
    """Write ``size`` random (incompressible) bytes to ``path``; returns their ``sha256:`` digest."""
    hasher = hashlib.sha256()
    with path.open("wb") as out:
        left = size
        while left:
            chunk = os.urandom(min(_WRITE_CHUNK, left))
            hasher.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    return "sha256:" + hasher.hexdigest()


async def _push_blob(session: aiohttp.ClientSession, registry: str, repository: str, digest: str, body: Any) -> None:
    """A monolithic upload: POST /blobs/uploads/, then PUT <location>?digest= with the whole body."""
    async with session.post(f"{registry}/v2/{repository}/blobs/uploads/") as started:
        if started.status != 202:
            raise RuntimeError(f"upload to {registry} refused: HTTP {started.status} {await started.text()}")
        location = started.headers["Location"]
    if location.startswith("/"):
        location = registry + location
    separator = "&" if "?" in location else "?"
    headers = {"Content-Type": "application/octet-stream"}
    async with session.put(f"{location}{separator}digest={digest}", data=body, headers=headers) as done:
        if done.status != 201:
            raise RuntimeError(f"upload of {digest} failed: HTTP {done.status} {await done.text()}")


async def push_random_image(
    session: aiohttp.ClientSession, registry: str, repository: str, tag: str, size: int, scratch: Path
) -> Blob:
    """Push an image whose one layer is ``size`` fresh random bytes; the scratch file is removed after."""
    scratch.parent.mkdir(parents=True, exist_ok=True)
    digest = await asyncio.to_thread(write_random_file, scratch, size)
    try:
        with scratch.open("rb") as body:
            await _push_blob(session, registry, repository, digest, body)
    finally:
        await asyncio.to_thread(scratch.unlink, missing_ok=True)
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [digest]}}
    ).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    await _push_blob(session, registry, repository, config_digest, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": digest, "size": size}],
    }
    async with session.put(
        f"{registry}/v2/{repository}/manifests/{tag}",
        data=json.dumps(manifest).encode(),
        headers={"Content-Type": MANIFEST_MEDIA_TYPE},
    ) as response:
        if response.status != 201:
            raise RuntimeError(f"manifest push failed: HTTP {response.status} {await response.text()}")
    return Blob(repository=repository, tag=tag, digest=digest, size=size)


def origin_usage(registry: RegistryServer, blob: Blob, since: int) -> dict[str, Any]:
    """What the registry served since the access-log mark ``since``: the blob's bytes and every request."""
    records = registry.access_log(since=since)
    blob_gets = [r for r in records if r.method == "GET" and r.blob_digest == blob.digest]
    served = sum(r.bytes_sent for r in blob_gets if r.status in (200, 206))
    by_kind: dict[str, int] = {}
    for record in records:
        kind = "blob" if record.blob_digest is not None else ("manifest" if "/manifests/" in record.path else "other")
        key = f"{record.method} {kind}"
        by_kind[key] = by_kind.get(key, 0) + 1
    return {
        "bytes": served,
        "bytes_ratio": round(served / blob.size, 4) if blob.size else 0.0,
        "requests": len(records),
        "blob_gets": len(blob_gets),
        "blob_get_statuses": sorted({r.status for r in blob_gets}),
        "requests_by_kind": dict(sorted(by_kind.items())),
    }


class AccessLogWatch:
    """When each GET of one blob finished on the origin, to a few tens of milliseconds.

    The log's own timestamp is when a request *started*, in whole seconds; but gorilla writes the line
    right after the handler has written the last byte, so the moment a line appears is when that
    response ended. Polling the file while the clients pull sees that moment.
    """

    def __init__(self, registry: RegistryServer, blob: Blob, offset: int) -> None:
        self.path = registry.access_log_path
        self.digest = blob.digest
        self.offset = offset
        self.finished: list[float] = []  # perf_counter() of each blob GET line's arrival
        self._pending = b""

    def poll(self) -> None:
        """Read what was appended since the last poll."""
        with self.path.open("rb") as log:
            log.seek(self.offset)
            data = log.read()
        self.offset += len(data)
        now = time.perf_counter()
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()
        for line in lines:
            record = parse_access_line(line.decode(errors="replace"))
            if record is not None and record.method == "GET" and record.blob_digest == self.digest:
                self.finished.append(now)

    async def run(self, interval: float = 0.05) -> None:
        """Poll until cancelled."""
        while True:
            await asyncio.to_thread(self.poll)
            await asyncio.sleep(interval)


def start_origin(workdir: Path) -> RegistryServer:
    """The origin registry."""
    return RegistryServer(workdir).start()


def start_pull_through_cache(workdir: Path, origin_url: str) -> RegistryServer:
    """A docker-registry in proxy mode (``proxy: {remoteurl: origin}``), cold, in ``workdir``."""
    return RegistryServer(workdir, proxy_remote_url=origin_url).start()


def registry_version() -> str:
    """docker-registry's own version line."""
    binary = shutil.which("docker-registry") or "docker-registry"
    with contextlib.suppress(OSError):
        return subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    return "unknown"


class NginxServer:
    """nginx with ``sendfile on`` serving one file at ``/blob``, on a free loopback port."""

    def __init__(self, workdir: Path, file: Path) -> None:
        self.workdir = workdir
        self.file = file
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The file's URL."""
        return f"http://127.0.0.1:{self.port}/blob"

    def config(self) -> str:
        """nginx.conf: one worker (the proxy is one process too), sendfile, no access log."""
        # `user root` only so the worker can read a file under a 0700 temp dir; nginx ignores it (with
        # a warning) when it does not run as root.
        temp = self.workdir / "temp"
        return f"""
worker_processes 1;
daemon off;
user root;
pid {self.workdir / "nginx.pid"};
error_log {self.workdir / "error.log"} warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{self.port};
        location = /blob {{ alias {self.file}; }}
    }}
}}
"""

    def start(self) -> Self:
        """Write the config and start nginx in the foreground (it dies with us)."""
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise RuntimeError("nginx not found (Debian package nginx-light)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "temp").mkdir(exist_ok=True)
        conf = self.workdir / "nginx.conf"
        conf.write_text(self.config())
        log = (self.workdir / "stderr.log").open("ab")
        try:
            self.process = subprocess.Popen(
                [binary, "-p", str(self.workdir), "-c", str(conf), "-e", str(self.workdir / "error.log")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_die_with_parent,
            )
        finally:
            log.close()
        if not wait_for_port("127.0.0.1", self.port, 10):
            self.stop()
            raise RuntimeError(f"nginx did not start; see {self.workdir / 'error.log'}")
        return self

    def stop(self) -> None:
        """Stop nginx (SIGQUIT is its graceful stop; SIGKILL if it lingers)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGQUIT)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # Its own group (setpgrp): the master and its worker.
            process.wait(5)

    def version(self) -> str:
        """``nginx -v``."""
        result = subprocess.run([shutil.which("nginx") or "nginx", "-v"], capture_output=True, text=True, check=False)
        return result.stderr.strip()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
