"""A real, throwaway PostgreSQL cluster for tests (initdb + pg_ctl on a free loopback port).

initdb and postgres refuse to run as root, so as root we run them as the `postgres` system user
(created with useradd --system if the machine lacks it) via runuser, in a temp dir it owns.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.support.ports import free_port

PG_USER = "postgres"  # both the OS user (when root) and the database superuser


class PostgresStartError(RuntimeError):
    """initdb or pg_ctl failed."""


def _pg_binary(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    # Debian keeps the server binaries out of PATH; take the newest installed major.
    for bindir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (bindir / name).is_file():
            return str(bindir / name)
    raise PostgresStartError(f"{name} not found (apt-get install postgresql)")


def ensure_os_user(name: str = PG_USER) -> pwd.struct_passwd:
    """Return the OS account `name`, creating it as a system user if missing (root only)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    # Bare CI machines get the account from the postgresql package; this covers binaries without it.
    subprocess.run(
        ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(name)


class PostgresServer:
    """One PostgreSQL cluster in a private temp dir, listening on 127.0.0.1:port."""

    def __init__(self, *, port: int | None = None, base_dir: Path | None = None) -> None:
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="damselfly-pg-"))
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "sock"
        self.log_path = self.base_dir / "postgres.log"
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self._runas: list[str] = []
        self._started = False

    @property
    def host(self) -> str:
        """Listen address."""
        return "127.0.0.1"

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the `postgres` database (psycopg 3 driver)."""
        return self.database_url("postgres")

    def database_url(self, database: str) -> str:
        """SQLAlchemy URL of another database in this cluster."""
        return f"postgresql+psycopg://{PG_USER}@{self.host}:{self.port}/{database}"

    @property
    def dsn(self) -> str:
        """libpq connection string of the `postgres` database, for psycopg.connect()."""
        return f"host={self.host} port={self.port} user={PG_USER} dbname=postgres"

    def _run(self, argv: Sequence[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self._runas, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            # The postgres user may not be able to read the caller's cwd (e.g. /root).
            cwd=self.base_dir,
            stdin=subprocess.DEVNULL,
        )

    def start(self) -> Self:
        """initdb (trust auth) and pg_ctl start, waiting until it accepts connections."""
        if self._started:
            return self
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            account = ensure_os_user()
            for path in (self.base_dir, self.socket_dir):
                os.chown(path, account.pw_uid, account.pw_gid)
            # mkdtemp makes 0700 dirs; the postgres user owns ours now, and /tmp itself is world-x.
            self._runas = [shutil.which("runuser") or "runuser", "-u", account.pw_name, "--"]
        if not (self.data_dir / "PG_VERSION").exists():
            init = self._run(
                [
                    _pg_binary("initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    PG_USER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    # Skip fsyncs: a test cluster is thrown away, and fsync dominates initdb time.
                    "--no-sync",
                ]
            )
            if init.returncode != 0:
                raise PostgresStartError(f"initdb failed ({init.returncode}):\n{init.stdout}\n{init.stderr}")
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            options = " ".join(
                [
                    f"-p {self.port}",
                    f"-k {self.socket_dir}",
                    "-c listen_addresses=127.0.0.1",
                    # Durability is pointless for a throwaway cluster; these make DDL-heavy tests fast.
                    "-c fsync=off",
                    "-c synchronous_commit=off",
                    "-c full_page_writes=off",
                    "-c max_connections=200",
                ]
            )
            start = self._run(
                [
                    _pg_binary("pg_ctl"),
                    "start",
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_path),
                    "-w",
                    "-t",
                    "60",
                    "-o",
                    options,
                ]
            )
            if start.returncode == 0:
                self._started = True
                return self
            log = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
            if "already in use" in log and attempt + 1 < attempts:
                self.port = free_port()
                continue
            self.stop()
            raise PostgresStartError(f"pg_ctl start failed:\n{start.stdout}\n{start.stderr}\n{log}")
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """pg_ctl stop -m fast (immediate, then SIGKILL, as fallbacks); safe to call twice."""
        pidfile = self.data_dir / "postmaster.pid"
        if pidfile.exists():
            pg_ctl = _pg_binary("pg_ctl")
            for mode in ("fast", "immediate"):
                result = self._run([pg_ctl, "stop", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "30"])
                if result.returncode == 0 or not pidfile.exists():
                    break
            else:
                # The first line of postmaster.pid is the postmaster's PID: ours, started above.
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pidfile.read_text().splitlines()[0]), signal.SIGKILL)
        self._started = False

    def cleanup(self) -> None:
        """Stop and remove the temp dir (if this object created it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def create_database(self, name: str | None = None) -> str:
        """CREATE DATABASE (a fresh random name unless given); return its SQLAlchemy URL."""
        # Dev dependency, imported late so that registry-only users of this package don't need it.
        import psycopg
        from psycopg import sql

        name = name or f"test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.database_url(name)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE ... WITH (FORCE), ending leftover sessions."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """Start a throwaway cluster; stop it and delete its files on exit, even on failure."""
    with PostgresServer() as server:
        yield server
