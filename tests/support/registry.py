"""A real docker-registry (distribution v2) origin for tests, with its access log parsed.

The registry writes one Apache combined-format line per request to its stdout once the handler
returns (gorilla/handlers), e.g.

    127.0.0.1 - - [29/Nov/2026:18:41:37 +0000] "GET /v2/lib/py/blobs/sha256:b4.. HTTP/1.1" 206 615 "" "curl"

and its own logrus lines ("response completed", errors) to stderr. We send stdout to `access.log`
and stderr to `registry.log` in the work dir. The byte field is what the handler wrote: the blob size
for a full GET, the range length for a 206, 0 for upload PUT/PATCH, and for HEAD the size of an error
body that net/http never sends; so byte accounting only counts GET lines.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import bcrypt
import yaml

from tests.support.ports import free_port

# User-Agent prefix of our own barrier requests; they are filtered out of access_log().
_SYNC_AGENT = "damselfly-test-sync/"

# Apache combined log format as gorilla/handlers writes it. Quoted fields escape '"' and '\' with a
# backslash; the byte field is "-" only in theory (gorilla always writes a number).
_COMBINED_RE = re.compile(
    r"^(?P<remote>\S+) (?P<ident>\S+) (?P<user>\S+) \[(?P<time>[^\]]+)\] "
    r'"(?P<request>(?:[^"\\]|\\.)*)" (?P<status>\d{3}) (?P<bytes>\d+|-)'
    r'(?: "(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)")?\s*$'
)
_BLOB_PATH_RE = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+)$")
_UNESCAPE_RE = re.compile(r"\\(.)")


@dataclass(frozen=True)
class AccessRecord:
    """One parsed access-log line."""

    remote: str
    user: str
    time: datetime
    method: str
    uri: str  # request-URI as sent, query string included
    path: str  # uri without the query string
    protocol: str
    status: int
    bytes_sent: int
    referer: str
    user_agent: str

    @property
    def blob_digest(self) -> str | None:
        """The digest if this is a /v2/<name>/blobs/<digest> request, else None."""
        m = _BLOB_PATH_RE.match(self.path)
        return m.group("digest") if m else None

    @property
    def repository(self) -> str | None:
        """The repository name for /v2/<name>/{blobs,manifests,tags}/... requests, else None."""
        m = re.match(r"^/v2/(.+)/(?:blobs|manifests|tags)/", self.path)
        return m.group(1) if m else None


def parse_access_line(line: str) -> AccessRecord | None:
    """Parse one combined-format line; None if it is not one (blank or foreign output)."""
    m = _COMBINED_RE.match(line)
    if m is None:
        return None
    request = _UNESCAPE_RE.sub(r"\1", m.group("request"))
    # "METHOD URI PROTO"; a malformed request line is kept whole in uri rather than dropped.
    parts = request.split(" ")
    if len(parts) >= 3:
        method, uri, protocol = parts[0], " ".join(parts[1:-1]), parts[-1]
    else:
        method, uri, protocol = (parts[0] if parts else ""), request, ""
    raw_bytes = m.group("bytes")
    return AccessRecord(
        remote=m.group("remote"),
        user=m.group("user"),
        time=datetime.strptime(m.group("time"), "%d/%b/%Y:%H:%M:%S %z"),
        method=method,
        uri=uri,
        path=uri.split("?", 1)[0],
        protocol=protocol,
        status=int(m.group("status")),
        bytes_sent=0 if raw_bytes == "-" else int(raw_bytes),
        referer=_UNESCAPE_RE.sub(r"\1", m.group("referer") or ""),
        user_agent=_UNESCAPE_RE.sub(r"\1", m.group("agent") or ""),
    )


def htpasswd_line(user: str, password: str) -> str:
    """Return an htpasswd line with a bcrypt hash (the only scheme distribution accepts)."""
    # Cost 4 (the minimum): the registry verifies bcrypt on every request, and the default cost 12
    # would add ~200 ms to each one on this 2-core machine.
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return f"{user}:{hashed}\n"


def basic_auth_header(user: str, password: str) -> str:
    """Return the value of an Authorization header for HTTP basic auth."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class RegistryStartError(RuntimeError):
    """The registry process exited or never answered on its port."""


class RegistryServer:
    """A docker-registry process on 127.0.0.1 with filesystem storage under `workdir`."""

    def __init__(
        self,
        workdir: Path,
        *,
        htpasswd: tuple[str, str] | None = None,
        proxy_remote_url: str | None = None,
        proxy_credentials: tuple[str, str] | None = None,
        extra_config: Mapping[str, object] | None = None,
        port: int | None = None,
    ) -> None:
        binary = shutil.which("docker-registry") or shutil.which("registry")
        if binary is None:
            raise RegistryStartError("docker-registry not found on PATH (apt-get install docker-registry)")
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir = self.workdir / "storage"
        self.config_path = self.workdir / "config.yml"
        self.access_log_path = self.workdir / "access.log"
        self.log_path = self.workdir / "registry.log"
        self.htpasswd_path = self.workdir / "htpasswd"
        self.credentials = htpasswd
        self.proxy_remote_url = proxy_remote_url
        self.proxy_credentials = proxy_credentials
        self.extra_config = dict(extra_config or {})
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        # Fixed per instance so upload state stays valid across restart().
        self._secret = secrets.token_hex(16)
        self._proc: subprocess.Popen[bytes] | None = None
        self._files: list[IO[bytes]] = []

    # -- addresses ---------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """host:port, as used in image references."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """Base URL, http://127.0.0.1:PORT."""
        return f"http://{self.host}"

    @property
    def auth_header(self) -> str | None:
        """Authorization header value for the configured htpasswd user, if any."""
        return basic_auth_header(*self.credentials) if self.credentials else None

    @property
    def pid(self) -> int | None:
        """PID of the running registry process, if any."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    # -- lifecycle ---------------------------------------------------------------------------------

    def _config(self) -> dict[str, object]:
        config: dict[str, object] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "cache": {"blobdescriptor": "inmemory"},
                # No background upload purging: it would race with tests that inspect storage.
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": self.host,
                "secret": self._secret,
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.credentials is not None:
            self.htpasswd_path.write_text(htpasswd_line(*self.credentials))
            config["auth"] = {"htpasswd": {"realm": "damselfly-test", "path": str(self.htpasswd_path)}}
        if self.proxy_remote_url is not None:
            proxy: dict[str, str] = {"remoteurl": self.proxy_remote_url}
            if self.proxy_credentials is not None:
                proxy["username"], proxy["password"] = self.proxy_credentials
            config["proxy"] = proxy
        _deep_merge(config, self.extra_config)
        return config

    def start(self, timeout: float = 15.0) -> Self:
        """Start the process and wait until it answers HTTP on /v2/."""
        if self.pid is not None:
            return self
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            self.config_path.write_text(yaml.safe_dump(self._config(), sort_keys=False))
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            # Append mode: a restart() keeps the earlier requests in the same log.
            access = self.access_log_path.open("ab")
            errors = self.log_path.open("ab")
            self._files = [access, errors]
            self._proc = subprocess.Popen(
                [self.binary, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=access,
                stderr=errors,
                cwd=self.workdir,
                # Own process group, so stop() can kill exactly it and nothing else.
                start_new_session=True,
            )
            try:
                self._wait_ready(timeout)
                return self
            except RegistryStartError:
                self.stop()
                tail = self._log_since(log_offset)
                if "address already in use" in tail and attempt + 1 < attempts:
                    self.port = free_port()
                    continue
                raise RegistryStartError(f"docker-registry failed to start on {self.host}:\n{tail}") from None
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise RegistryStartError("exited")
            try:
                # Tagged like a barrier so the probe stays out of access_log().
                probe = urllib.request.Request(self.url + "/v2/", headers={"User-Agent": _SYNC_AGENT + "ready"})
                with urllib.request.urlopen(probe, timeout=1.0):
                    return
            except urllib.error.HTTPError:
                return  # 401 with htpasswd: it is up
            except OSError:
                time.sleep(0.05)
        raise RegistryStartError("timeout")

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the process and wait; SIGKILL its process group if it lingers."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    # Our own session (start_new_session), so this reaches only the registry.
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        for f in self._files:
            f.close()
        self._files = []

    def restart(self, timeout: float = 15.0) -> Self:
        """Stop and start again on the same port with the same storage and logs."""
        self.stop()
        self._fixed_port = True
        return self.start(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- access log --------------------------------------------------------------------------------

    def sync(self, timeout: float = 5.0) -> None:
        """Wait until requests already answered are in the access log.

        gorilla writes a line after the handler returns, which can be just after the client has read
        the whole body; a fresh barrier request that shows up in the log bounds that race.
        """
        if self.pid is None:
            return  # stopped: everything it will ever log is on disk
        agent = f"{_SYNC_AGENT}{uuid.uuid4()}"
        req = urllib.request.Request(self.url + "/v2/", headers={"User-Agent": agent})
        with contextlib.suppress(urllib.error.HTTPError):
            urllib.request.urlopen(req, timeout=timeout).close()
        deadline = time.monotonic() + timeout
        needle = agent.encode()
        while needle not in self.access_log_path.read_bytes():
            if time.monotonic() > deadline:
                raise TimeoutError(f"barrier request never reached {self.access_log_path}")
            time.sleep(0.01)
        # Handlers run in goroutines of their own: a request answered before the barrier can still log
        # after it (seen in CI under load). Wait until the log has been quiet for a moment too.
        size, quiet_since = self.access_log_path.stat().st_size, time.monotonic()
        while time.monotonic() - quiet_since < 0.2 and time.monotonic() < deadline:
            time.sleep(0.02)
            current = self.access_log_path.stat().st_size
            if current != size:
                size, quiet_since = current, time.monotonic()

    def mark(self) -> int:
        """Sync, then return a position in the access log; pass it as `since=` to see only later lines."""
        self.sync()
        data = self.access_log_path.read_bytes()
        # Only complete lines: a half-written one belongs after the mark.
        return data.rfind(b"\n") + 1

    def access_log(self, *, since: int = 0, sync: bool = True) -> list[AccessRecord]:
        """Parsed access-log records (barrier requests excluded), from byte offset `since`."""
        if sync:
            self.sync()
        data = self.access_log_path.read_bytes() if self.access_log_path.exists() else b""
        end = data.rfind(b"\n") + 1
        records = []
        for line in data[since:end].decode(errors="replace").splitlines():
            rec = parse_access_line(line)
            if rec is not None and not rec.user_agent.startswith(_SYNC_AGENT):
                records.append(rec)
        return records

    def requests(
        self, path_regex: str, *, method: str | None = None, since: int = 0, sync: bool = True
    ) -> list[AccessRecord]:
        """Records whose path matches `path_regex` (re.search), optionally only one method."""
        pattern = re.compile(path_regex)
        return [
            r
            for r in self.access_log(since=since, sync=sync)
            if pattern.search(r.path) and (method is None or r.method == method)
        ]

    def blob_bytes_served(self, digest: str, *, since: int = 0, sync: bool = True) -> int:
        """Bytes of blob `digest` the origin sent in answers to successful GETs (any repository)."""
        return sum(
            r.bytes_sent
            for r in self.access_log(since=since, sync=sync)
            if r.method == "GET" and r.status in (200, 206) and r.blob_digest == digest
        )

    def blob_bytes_total(self, *, since: int = 0, sync: bool = True) -> int:
        """Bytes of all blobs sent in answers to successful GETs."""
        return sum(
            r.bytes_sent
            for r in self.access_log(since=since, sync=sync)
            if r.method == "GET" and r.status in (200, 206) and r.blob_digest is not None
        )

    def wait_for_requests(
        self,
        path_regex: str,
        count: int = 1,
        *,
        method: str | None = None,
        since: int = 0,
        timeout: float = 10.0,
    ) -> list[AccessRecord]:
        """Poll until at least `count` matching records are logged; return them."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.requests(path_regex, method=method, since=since, sync=False)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(found)}/{count} requests matching {path_regex!r} after {timeout}s")
            time.sleep(0.02)

    def log_tail(self, lines: int = 30) -> str:
        """Last lines of the registry's own (stderr) log, for failure messages."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _deep_merge(base: dict[str, object], extra: Mapping[str, object]) -> None:
    for key, value in extra.items():
        current = base.get(key)
        if isinstance(current, dict) and isinstance(value, Mapping):
            _deep_merge(current, value)
        else:
            base[key] = value


def start_registry(
    workdir: Path,
    *,
    htpasswd: tuple[str, str] | None = None,
    proxy_remote_url: str | None = None,
    proxy_credentials: tuple[str, str] | None = None,
    extra_config: Mapping[str, object] | None = None,
) -> RegistryServer:
    """Start a registry in `workdir` and return it running; use it as a context manager to stop it."""
    return RegistryServer(
        workdir,
        htpasswd=htpasswd,
        proxy_remote_url=proxy_remote_url,
        proxy_credentials=proxy_credentials,
        extra_config=extra_config,
    ).start()
