"""The database: sqlmodel on SQLite by default, any SQLAlchemy URL (PostgreSQL) by config."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import SQLModel, create_engine

from shared.errors import ConfigError, DependencyUnavailable


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of a SQLite file."""
    return f"sqlite:///{path}"


def _enable_sqlite_wal(dbapi_connection: object, _record: object) -> None:
    # WAL lets the API read while a handler writes; NORMAL sync is safe with WAL and much faster.
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def create_db_engine(url: str) -> Engine:
    """An engine for ``url``; for SQLite the file's directory is created and WAL is switched on."""
    try:
        if url.startswith("sqlite"):
            database = url.split("///", 1)[1] if "///" in url else ""
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"check_same_thread": False})
            event.listen(engine, "connect", _enable_sqlite_wal)
            return engine
        return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise ConfigError(f"config error: unusable database URL {url!r}: {exc}") from exc


def create_tables(engine: Engine) -> None:
    """Create every table the imported sqlmodel models declare (idempotent)."""
    try:
        SQLModel.metadata.create_all(engine)
    except SQLAlchemyError as exc:
        raise DependencyUnavailable(f"database unavailable: {exc.__class__.__name__}: {exc}") from exc


def _ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


async def database_ready(engine: Engine) -> bool:
    """Whether the database answers a trivial query (run off the event loop)."""
    try:
        await asyncio.wait_for(asyncio.to_thread(_ping, engine), timeout=2.0)
    except (SQLAlchemyError, OSError, TimeoutError):
        return False
    return True
