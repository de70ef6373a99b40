"""A node's piece store: one sparse data file per task, metadata in SQL, shared by the node's processes.

Three processes of a node use one store at once: the registry-proxy and the seed-fetcher write the pieces
they download, and the cache-store serves them to other peers. Pieces are never relayed between them: they
share the storage directory and the database (SQLite in WAL mode by default), so each byte is on disk once.

Layout: ``<root>/tasks/<id[:3]>/<id>.data`` holds task ``<id>``'s blob at its own offsets (a sparse file
truncated to the blob's length at creation); the tables ``piece_store_tasks`` and ``piece_store_pieces``
hold each task's layout and access times, and each held piece's length and digest. Task ids are checked
to be 64 lowercase hex characters before any path is built from them.

Concurrency. Every change to a task (creating its file, recording a piece, forgetting one, deleting the
task) holds an exclusive ``flock(2)`` on the task's data file. flock locks belong to an open file
description, so they exclude other processes *and* other threads of this one (each call opens its own);
after taking it, the holder checks the path still names the file it locked, since a delete may have
unlinked it meanwhile. A piece is recorded in the database only after its bytes are in the file, so a
recorded piece always has its bytes. On SQLite, write transactions start with ``BEGIN IMMEDIATE``: a
deferred transaction that reads and then writes fails at once with SQLITE_BUSY when another process
wrote in between, while an immediate one waits (``busy_timeout``) for the write lock.

Serving-time integrity. :meth:`PieceStore.read_piece` always hashes what it reads. The zero-copy path
(:meth:`PieceStore.open_piece`, :meth:`PieceStore.piece_file_range`) hashes only when the data file
changed behind the store's back, so a sound piece is served straight from the page cache:

- each piece records the data file's stat *stamp* (size, mtime_ns, ctime_ns, inode) as of its last
  verification, with the task's *epoch* at that time;
- the task records the stamp its last store write left and an epoch. A store write that finds the file as
  the task's stamp says (nothing else touched it) moves the stamp on and keeps the epoch, so pieces
  verified before stay trusted; a write that finds anything else starts a new epoch;
- before serving, a piece is trusted when the file's current stat equals its own stamp, or equals the
  task's stamp while the piece's epoch is current. Otherwise it is re-hashed once: re-stamped if sound,
  forgotten (so it is fetched again) and reported as :class:`~shared.errors.DigestMismatch` if not.

What this does not catch: a change within the same tick of the kernel's coarse file clock (a few
milliseconds) as a store write, and corruption below the file system (bit rot changes no stat).
Downloaders check every piece against the digest it was announced with, so such a piece costs one failed
download, never a corrupt blob; :meth:`PieceStore.verify_piece` re-hashes on demand (scrubbing).

Durability. Piece bytes are not fsynced (that would cost a disk flush per piece); a crash may lose the
last pieces written. Their records then fail verification (read_piece hashes; the stat stamp of a file
rewritten by recovery differs) and they are fetched again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from blake3 import blake3
from sqlalchemy import BigInteger, Column, Connection, Table, delete, event, func, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlmodel import Field, SQLModel

from shared.db import create_db_engine, sqlite_url
from shared.errors import DependencyUnavailable, DigestMismatch, InvalidRequest, PieceNotFound, TaskNotFound
from shared.tasks import PieceRange, piece_count, piece_range, pieces_covering, sha256_digest

logger = logging.getLogger(__name__)

__all__ = ["OpenPiece", "PieceStore", "StoreUsage", "StoredTask", "is_task_id", "validate_task_id"]

_TASK_ID_RE = re.compile(r"[0-9a-f]{64}")
# What a piece may be announced with (shared.schemas.PieceDigest); the store records sha256 whatever it is.
_PIECE_DIGEST_RE = re.compile(r"(sha256|blake3):[0-9a-f]{64}")
# OCI digest grammar, loosely: the blob digest is kept for callers, the store never recomputes it.
_BLOB_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[A-Za-z0-9=_-]{32,256}")
# Hashing one piece reads at most this much at a time, so a 15 MiB piece is not held in memory twice.
_HASH_CHUNK = 1024 * 1024
_TASKS_TABLE = "piece_store_tasks"
# Outcomes of re-hashing a piece under its task's lock.
_SOUND, _CORRUPT, _MISSING = "sound", "corrupt", "missing"
_PIECES_TABLE = "piece_store_pieces"


class TaskRow(SQLModel, table=True):
    """One task (blob) the store has a data file for."""

    __tablename__ = _TASKS_TABLE

    task_id: str = Field(primary_key=True, max_length=64)
    url: str
    digest: str | None = Field(default=None, max_length=300)
    # BigInteger: PostgreSQL's INTEGER would overflow on blobs over 2 GiB.
    content_length: int = Field(sa_column=Column(BigInteger, nullable=False))
    piece_size: int
    piece_count: int
    completed: bool = False
    # Times are Unix seconds (float): cheap to compare in SQL on every backend, no time zone ambiguity.
    created_at: float
    last_access_at: float = Field(index=True)
    last_write_at: float
    file_stamp: str = Field(max_length=100)
    stamp_epoch: int = 0


class PieceRow(SQLModel, table=True):
    """One piece held in its task's data file."""

    __tablename__ = _PIECES_TABLE

    task_id: str = Field(primary_key=True, max_length=64)
    number: int = Field(primary_key=True)
    length: int
    digest: str = Field(max_length=80)
    verified_stamp: str = Field(max_length=100)
    verified_epoch: int


_TASKS: Table = SQLModel.metadata.tables[_TASKS_TABLE]
_PIECES: Table = SQLModel.metadata.tables[_PIECES_TABLE]


@dataclass(frozen=True)
class StoredTask:
    """A task as the store knows it."""

    task_id: str
    url: str
    digest: str | None
    content_length: int
    piece_size: int
    piece_count: int
    completed: bool
    created_at: datetime
    last_access_at: datetime


@dataclass(frozen=True)
class StoreUsage:
    """How much the store holds."""

    bytes_on_disk: int
    task_count: int
    piece_count: int


@dataclass
class WrittenPieces:
    """What :meth:`PieceStore.write_pieces` did: the digest of each piece stored (or already held alike),
    and why each other one was refused."""

    stored: dict[int, str] = field(default_factory=dict)
    failed: dict[int, DigestMismatch] = field(default_factory=dict)


@dataclass
class OpenPiece:
    """A verified piece ready to be served: an open file descriptor on its data file, and where it lies.

    The caller owns ``fd`` and must close it (:meth:`close`, or use it as a context manager). Reading
    from this descriptor reads the bytes that were checked, even if the task is deleted meanwhile.
    """

    fd: int
    offset: int
    length: int
    digest: str

    def close(self) -> None:
        """Close the file descriptor (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> OpenPiece:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def is_task_id(value: str) -> bool:
    """Whether ``value`` is a task id: 64 lowercase hex characters, nothing else."""
    return isinstance(value, str) and _TASK_ID_RE.fullmatch(value) is not None


def validate_task_id(value: str) -> str:
    """``value`` if it is a task id, else InvalidRequest (checked before any path is built from it)."""
    if not is_task_id(value):
        shown = value[:80] if isinstance(value, str) else type(value).__name__
        raise InvalidRequest(f"invalid task id {shown!r}: expected 64 lowercase hex characters")
    return value


def _stamp(fd: int) -> str:
    """The stat stamp of an open file: what changes when anything writes it, truncates it or replaces it."""
    st = os.fstat(fd)
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    """Exactly ``length`` bytes at ``offset`` (a sparse hole reads as zeros; a short file is an error)."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            raise OSError(errno.EIO, f"data file ends at {offset + got}, expected {offset + length}")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _hash_region(fd: int, offset: int, length: int) -> str:
    """``sha256:`` of ``length`` bytes at ``offset``, read a chunk at a time; a short file hashes short."""
    hasher = hashlib.sha256()
    done = 0
    while done < length:
        chunk = os.pread(fd, min(_HASH_CHUNK, length - done), offset + done)
        if not chunk:
            break
        hasher.update(chunk)
        done += len(chunk)
    return "sha256:" + hasher.hexdigest()


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _sqlite_autocommit_driver(dbapi_connection: Any, _record: object) -> None:
    # The sqlite3 module's own transaction handling would BEGIN (deferred) behind our back; with it off,
    # the "begin" listener below decides the kind of transaction.
    dbapi_connection.isolation_level = None


def _sqlite_begin(connection: Connection) -> None:
    mode = "IMMEDIATE" if connection.get_execution_options().get("piece_store_write") else "DEFERRED"
    connection.exec_driver_sql(f"BEGIN {mode}")


def _as_task(row: Any) -> StoredTask:
    return StoredTask(
        task_id=row.task_id,
        url=row.url,
        digest=row.digest,
        content_length=row.content_length,
        piece_size=row.piece_size,
        piece_count=row.piece_count,
        completed=bool(row.completed),
        created_at=datetime.fromtimestamp(row.created_at, UTC),
        last_access_at=datetime.fromtimestamp(row.last_access_at, UTC),
    )


class PieceStore:
    """A node's pieces on disk and their metadata; safe to use from several processes and threads at once."""

    def __init__(
        self,
        root: Path,
        database_url: str | None = None,
        *,
        touch_interval_seconds: float = 1.0,
        write_grace_seconds: float = 10.0,
    ) -> None:
        self.root = Path(root)
        self.tasks_dir = self.root / "tasks"
        self.tasks_dir.mkdir(parents=True, exist_ok=True)
        self.database_url = database_url or sqlite_url(self.root / "store.db")
        # touch() writes a task's access time at most this often per task (GC only needs coarse LRU order).
        self.touch_interval_seconds = touch_interval_seconds
        # GC leaves a task alone while it was written (or opened) this recently: a download is under way.
        self.write_grace_seconds = write_grace_seconds
        self.engine: Engine = create_db_engine(self.database_url)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_autocommit_driver)
            event.listen(self.engine, "begin", _sqlite_begin)
        self._touched: dict[str, float] = {}
        self._touch_lock = threading.Lock()
        self._waiters: dict[tuple[str, int], list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._waiters_lock = threading.Lock()
        self._create_tables()

    # --- set-up --------------------------------------------------------------------------------------

    def _create_tables(self) -> None:
        # Several processes may open a fresh store together: the first switch to WAL mode needs an
        # exclusive lock and fails at once (not after busy_timeout) when another connection holds one.
        delay = 0.02
        for attempt in range(10):
            try:
                with self.engine.connect().execution_options(piece_store_write=True) as conn, conn.begin():
                    SQLModel.metadata.create_all(conn, tables=[_TASKS, _PIECES])
                return
            except OperationalError as exc:
                if attempt == 9:
                    raise DependencyUnavailable(f"piece store database unavailable: {exc.orig}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()

    # --- database helpers ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn:
                yield conn
        except OperationalError as exc:
            raise DependencyUnavailable(f"piece store database unavailable: {exc.orig}") from exc

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        try:
            with self.engine.connect().execution_options(piece_store_write=True) as conn, conn.begin():
                yield conn
        except OperationalError as exc:
            raise DependencyUnavailable(f"piece store database unavailable: {exc.orig}") from exc

    def _task_row(self, conn: Connection, task_id: str) -> Any:
        return conn.execute(select(_TASKS).where(_TASKS.c.task_id == task_id)).first()

    def _require_task(self, conn: Connection, task_id: str) -> Any:
        row = self._task_row(conn, task_id)
        if row is None:
            raise TaskNotFound(f"task {task_id} is not in the store", task_id=task_id)
        return row

    def _piece_row(self, conn: Connection, task_id: str, number: int) -> Any:
        return conn.execute(select(_PIECES).where(_PIECES.c.task_id == task_id, _PIECES.c.number == number)).first()

    # --- files ---------------------------------------------------------------------------------------

    def data_path(self, task_id: str) -> Path:
        """The data file of task ``task_id`` (validated first: no path tricks)."""
        validate_task_id(task_id)
        return self.tasks_dir / task_id[:3] / f"{task_id}.data"

    @contextlib.contextmanager
    def _locked(self, task_id: str, *, create: bool) -> Iterator[int | None]:
        """An fd on the task's data file under an exclusive flock; None when it does not exist (and not create).

        After the lock is taken the path must still name the locked file: a concurrent delete may have
        unlinked it while we waited, and writing to an unlinked file would lose the bytes.
        """
        path = self.data_path(task_id)
        while True:
            flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
            try:
                fd = os.open(path, flags, 0o644)
            except FileNotFoundError:
                if not create:
                    yield None
                    return
                path.parent.mkdir(parents=True, exist_ok=True)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    current = os.stat(path).st_ino
                except FileNotFoundError:
                    current = -1
                if current != os.fstat(fd).st_ino:
                    continue  # Unlinked (or replaced) while we waited: start over on the new file.
                yield fd
                return
            finally:
                os.close(fd)  # Closing the last descriptor of the description drops the flock.

    # --- tasks ---------------------------------------------------------------------------------------

    def open_task(
        self, task_id: str, *, url: str, content_length: int, piece_size: int, digest: str | None = None
    ) -> StoredTask:
        """Create the task and its data file, or return it when it exists with the same layout (idempotent)."""
        validate_task_id(task_id)
        if content_length < 0:
            raise InvalidRequest(f"negative content length {content_length}", task_id=task_id)
        if piece_size <= 0:
            raise InvalidRequest(f"piece size must be positive, got {piece_size}", task_id=task_id)
        if digest is not None and not _BLOB_DIGEST_RE.fullmatch(digest):
            raise InvalidRequest(f"not a digest: {digest[:80]!r}", task_id=task_id)
        with self._read() as conn:
            existing = self._task_row(conn, task_id)
        if existing is not None:
            self._check_same_layout(existing, content_length, piece_size, digest)
        with self._locked(task_id, create=True) as fd:
            assert fd is not None  # create=True always yields a descriptor.
            now = time.time()
            with self._write() as conn:
                row = self._task_row(conn, task_id)
                if row is None:
                    # A file left by an earlier life of this task (a crash before its rows were written)
                    # may hold stale bytes: drop them, then size the file for the blob, sparse.
                    os.ftruncate(fd, 0)
                    os.ftruncate(fd, content_length)
                    conn.execute(
                        insert(_TASKS).values(
                            task_id=task_id,
                            url=url,
                            digest=digest,
                            content_length=content_length,
                            piece_size=piece_size,
                            piece_count=piece_count(content_length, piece_size),
                            completed=content_length == 0,  # An empty blob has all of its zero pieces.
                            created_at=now,
                            last_access_at=now,
                            last_write_at=now,
                            file_stamp=_stamp(fd),
                            stamp_epoch=0,
                        )
                    )
                else:
                    self._check_same_layout(row, content_length, piece_size, digest)
                    self._repair_file(conn, fd, row)
                    values: dict[str, Any] = {"last_write_at": now}
                    if digest is not None and row.digest is None:
                        values["digest"] = digest
                    conn.execute(update(_TASKS).where(_TASKS.c.task_id == task_id).values(**values))
                return _as_task(self._require_task(conn, task_id))

    @staticmethod
    def _check_same_layout(row: Any, content_length: int, piece_size: int, digest: str | None) -> None:
        if row.content_length != content_length or row.piece_size != piece_size:
            raise InvalidRequest(
                f"task {row.task_id} exists with content length {row.content_length} and piece size "
                f"{row.piece_size}, not {content_length} and {piece_size}",
                task_id=row.task_id,
            )
        if digest is not None and row.digest is not None and digest != row.digest:
            raise InvalidRequest(f"task {row.task_id} exists with digest {row.digest}, not {digest}")

    def _repair_file(self, conn: Connection, fd: int, row: Any) -> None:
        """Re-open an existing task's file: a file created anew or resized lost its pieces' bytes."""
        st = os.fstat(fd)
        if st.st_size == row.content_length and _stamp(fd) == row.file_stamp:
            return
        if st.st_size == 0 and row.content_length > 0:
            # The file was deleted behind our back (we just created it empty): its pieces are gone.
            conn.execute(delete(_PIECES).where(_PIECES.c.task_id == row.task_id))
            conn.execute(update(_TASKS).where(_TASKS.c.task_id == row.task_id).values(completed=False))
        if st.st_size != row.content_length:
            os.ftruncate(fd, row.content_length)
        # Something changed the file outside the store: a new epoch makes every piece be re-verified.
        conn.execute(
            update(_TASKS)
            .where(_TASKS.c.task_id == row.task_id)
            .values(file_stamp=_stamp(fd), stamp_epoch=_TASKS.c.stamp_epoch + 1)
        )

    def get_task(self, task_id: str) -> StoredTask | None:
        """The task, or None when the store does not have it."""
        validate_task_id(task_id)
        with self._read() as conn:
            row = self._task_row(conn, task_id)
        return None if row is None else _as_task(row)

    def list_tasks(self) -> list[StoredTask]:
        """Every task, least recently used first."""
        with self._read() as conn:
            rows = conn.execute(select(_TASKS).order_by(_TASKS.c.last_access_at)).all()
        return [_as_task(row) for row in rows]

    def mark_completed(self, task_id: str) -> None:
        """Record that the task is complete; InvalidRequest unless every piece is held."""
        validate_task_id(task_id)
        with self._write() as conn:
            row = self._require_task(conn, task_id)
            held = conn.execute(
                select(func.count()).select_from(_PIECES).where(_PIECES.c.task_id == task_id)
            ).scalar_one()
            if held != row.piece_count:
                raise InvalidRequest(
                    f"task {task_id} holds {held} of {row.piece_count} pieces; it is not complete",
                    task_id=task_id,
                )
            conn.execute(update(_TASKS).where(_TASKS.c.task_id == task_id).values(completed=True))

    def touch(self, task_id: str) -> None:
        """Record an access to the task for LRU eviction (at most once per ``touch_interval_seconds``)."""
        validate_task_id(task_id)
        now = time.monotonic()
        with self._touch_lock:
            last = self._touched.get(task_id)
            if last is not None and now - last < self.touch_interval_seconds:
                return
            if len(self._touched) > 10_000:
                # Keep the rate limiter's memory bounded: forget entries old enough not to limit anything.
                self._touched = {key: at for key, at in self._touched.items() if now - at < self.touch_interval_seconds}
            self._touched[task_id] = now
        with self._write() as conn:
            conn.execute(update(_TASKS).where(_TASKS.c.task_id == task_id).values(last_access_at=time.time()))

    def delete_task(self, task_id: str) -> None:
        """Forget the task and remove its data file (no error when it is not there)."""
        with self._locked(task_id, create=False) as fd:
            self._delete_locked(task_id, fd, condition=None)

    def _delete_locked(self, task_id: str, fd: int | None, condition: Any) -> bool:
        with self._write() as conn:
            statement = delete(_TASKS).where(_TASKS.c.task_id == task_id)
            if condition is not None:
                statement = statement.where(condition)
            if conn.execute(statement).rowcount == 0 and condition is not None:
                return False
            if fd is not None:
                # Unlinked before the rows go, so a crash in between leaves rows without a file (repaired
                # or evicted later), never a file nobody accounts for. We hold the task's lock: a writer
                # waiting for it then finds the path gone and gives up.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.data_path(task_id))
            conn.execute(delete(_PIECES).where(_PIECES.c.task_id == task_id))
        with self._touch_lock:
            self._touched.pop(task_id, None)
        return True

    # --- pieces --------------------------------------------------------------------------------------

    def held_pieces(self, task_id: str) -> dict[int, str]:
        """Piece number -> piece digest (``sha256:…``) of every piece held."""
        validate_task_id(task_id)
        with self._read() as conn:
            rows = conn.execute(
                select(_PIECES.c.number, _PIECES.c.digest)
                .where(_PIECES.c.task_id == task_id)
                .order_by(_PIECES.c.number)
            ).all()
        return {row.number: row.digest for row in rows}

    def has_piece(self, task_id: str, number: int) -> bool:
        """Whether the piece is held."""
        validate_task_id(task_id)
        with self._read() as conn:
            return self._piece_row(conn, task_id, number) is not None

    def _layout(self, row: Any, number: int) -> PieceRange:
        try:
            return piece_range(number, row.content_length, row.piece_size)
        except InvalidRequest as exc:
            raise InvalidRequest(exc.message, task_id=row.task_id, piece=number) from exc

    def write_piece(
        self,
        task_id: str,
        number: int,
        data: bytes | memoryview,
        expected_digest: str | None = None,
        *,
        checked: bool = False,
    ) -> str:
        """Store piece ``number`` and return its digest; a piece already held is left as is (idempotent).

        The length must be the piece's length and, when ``expected_digest`` is given (``sha256:`` or
        ``blake3:``), the digest must match (else DigestMismatch and nothing is stored); the returned and
        recorded digest is always sha256. ``checked``: the caller has just hashed these very bytes and
        found the sha256 ``expected_digest``, so they are not hashed again. The bytes are written at the
        piece's offset first and recorded after, so a recorded piece always has its bytes.
        """
        written = self.write_pieces(task_id, [(number, data, expected_digest)], checked={number} if checked else ())
        if number in written.failed:
            raise written.failed[number]
        return written.stored[number]

    def write_pieces(
        self,
        task_id: str,
        pieces: Sequence[tuple[int, bytes | memoryview, str | None]],
        *,
        checked: Collection[int] = (),
    ) -> WrittenPieces:
        """Store several pieces of one task, each as :meth:`write_piece` would, in one lock and one transaction.

        ``checked``: numbers of pieces whose sha256 expected digest the caller has just computed from these
        very bytes (not hashed again).

        ``pieces`` are ``(number, data, expected_digest)``. A piece whose digest does not match (or differs
        from the one held) is in ``failed`` and not stored; the others are stored all the same. A wrong
        length or digest format is the caller's bug: InvalidRequest, nothing stored.
        """
        validate_task_id(task_id)
        for _number, _data, expected in pieces:
            if expected is not None and not _PIECE_DIGEST_RE.fullmatch(expected):
                raise InvalidRequest(f"expected digest must be sha256:<hex> or blake3:<hex>, got {expected[:80]!r}")
        numbers = [number for number, _data, _expected in pieces]
        with self._read() as conn:
            task = self._require_task(conn, task_id)
            held = self._piece_rows(conn, task_id, numbers)
        written = WrittenPieces()
        to_write: list[tuple[PieceRange, bytes | memoryview, str]] = []
        for number, data, expected in pieces:
            layout = self._layout(task, number)
            if len(data) != layout.length:
                raise InvalidRequest(
                    f"piece {number} of task {task_id} is {layout.length} bytes, got {len(data)}",
                    task_id=task_id,
                    piece=number,
                )
            # A digest the caller computed from these bytes a moment ago is not computed again (hot path).
            trusted = expected is not None and number in checked and expected.startswith("sha256:")
            digest = expected if trusted and expected is not None else sha256_digest(data)
            if expected is not None and not trusted:
                actual = digest if expected.startswith("sha256:") else "blake3:" + blake3(data).hexdigest()
                if actual != expected:
                    written.failed[number] = DigestMismatch(expected, actual, what=f"piece {number} of task {task_id}")
                    continue
            if number in held:
                self._settle_held(written, held[number], digest)
            else:
                to_write.append((layout, data, digest))
        if to_write:
            for _ in range(2):
                with self._locked(task_id, create=False) as fd:
                    if fd is not None:
                        self._write_locked(task, to_write, fd, written)
                        break
                # The data file vanished (deleted outside the store) while the task is still recorded:
                # open_task re-creates it and forgets the pieces it held, then the write is retried.
                self.open_task(task_id, url=task.url, content_length=task.content_length, piece_size=task.piece_size)
            else:
                raise TaskNotFound(f"the data file of task {task_id} keeps disappearing", task_id=task_id)
        for number in written.stored:
            self._wake(task_id, number)
        return written

    def _piece_rows(self, conn: Connection, task_id: str, numbers: Sequence[int]) -> dict[int, Any]:
        rows = conn.execute(
            select(_PIECES).where(_PIECES.c.task_id == task_id, _PIECES.c.number.in_(list(numbers)))
        ).all()
        return {row.number: row for row in rows}

    def _settle_held(self, written: WrittenPieces, held: Any, digest: str) -> None:
        try:
            written.stored[held.number] = self._same_as_held(held, digest)
        except DigestMismatch as exc:
            written.failed[held.number] = exc

    def _write_locked(
        self,
        task: Any,
        pieces: list[tuple[PieceRange, bytes | memoryview, str]],
        fd: int,
        written: WrittenPieces,
    ) -> None:
        with self._read() as conn:
            held = self._piece_rows(conn, task.task_id, [layout.number for layout, _data, _digest in pieces])
        new = []
        for layout, data, digest in pieces:
            if layout.number in held:
                self._settle_held(written, held[layout.number], digest)  # Another writer got there first.
            else:
                new.append((layout, data, digest))
        if not new:
            return
        before = _stamp(fd)
        for layout, data, _digest in new:
            _pwrite_all(fd, data, layout.start)
        after = _stamp(fd)
        with self._write() as conn:
            current = self._require_task(conn, task.task_id)
            if (current.content_length, current.piece_size) != (task.content_length, task.piece_size):
                raise InvalidRequest(f"task {task.task_id} was re-created with another layout", task_id=task.task_id)
            # Nobody else touched the file since the store's last write: pieces verified before stay trusted.
            epoch = current.stamp_epoch if current.file_stamp == before else current.stamp_epoch + 1
            conn.execute(
                update(_TASKS)
                .where(_TASKS.c.task_id == task.task_id)
                .values(file_stamp=after, stamp_epoch=epoch, last_write_at=time.time())
            )
            conn.execute(
                insert(_PIECES),
                [
                    {
                        "task_id": task.task_id,
                        "number": layout.number,
                        "length": layout.length,
                        "digest": digest,
                        "verified_stamp": after,
                        "verified_epoch": epoch,
                    }
                    for layout, _data, digest in new
                ],
            )
        for layout, _data, digest in new:
            written.stored[layout.number] = digest

    @staticmethod
    def _same_as_held(held: Any, digest: str) -> str:
        if held.digest != digest:
            raise DigestMismatch(held.digest, digest, what=f"piece {held.number} of task {held.task_id} (held)")
        return str(held.digest)

    def read_piece(self, task_id: str, number: int) -> bytes:
        """The piece's bytes, hashed against its recorded digest; a corrupt piece is forgotten (DigestMismatch)."""
        validate_task_id(task_id)
        for _ in range(2):
            with self._read() as conn:
                task = self._require_task(conn, task_id)
                held = self._piece_row(conn, task_id, number)
            if held is None:
                raise PieceNotFound(f"piece {number} of task {task_id} is not held", task_id=task_id, piece=number)
            layout = self._layout(task, number)
            try:
                fd = os.open(self.data_path(task_id), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError as exc:
                raise PieceNotFound(f"task {task_id} was deleted", task_id=task_id, piece=number) from exc
            try:
                data = _pread_exact(fd, layout.length, layout.start)
            except OSError:
                data = b""
            finally:
                os.close(fd)
            if sha256_digest(data) == held.digest:
                return data
            # Confirm under the lock (and forget the piece if it is corrupt); "sound" means another
            # process replaced the file meanwhile, so read again.
            status, actual = self._verify(task_id, number)
            if status == _MISSING:
                raise PieceNotFound(f"piece {number} of task {task_id} is not held", task_id=task_id, piece=number)
            if status == _CORRUPT:
                raise DigestMismatch(held.digest, actual or "", what=f"piece {number} of task {task_id} on disk")
        raise DigestMismatch(held.digest, sha256_digest(data), what=f"piece {number} of task {task_id} on disk")

    def verify_piece(self, task_id: str, number: int) -> bool:
        """Re-hash the piece from disk: True when held and sound; a corrupt piece is forgotten (False)."""
        validate_task_id(task_id)
        return self._verify(task_id, number)[0] == _SOUND

    def _verify(self, task_id: str, number: int) -> tuple[str, str | None]:
        """(_SOUND | _CORRUPT | _MISSING, the digest found on disk) for the piece, checked under the lock."""
        with self._locked(task_id, create=False) as fd:
            if fd is None:
                return _MISSING, None
            with self._read() as conn:
                task = self._task_row(conn, task_id)
                held = self._piece_row(conn, task_id, number) if task is not None else None
            if task is None or held is None:
                return _MISSING, None
            layout = self._layout(task, number)
            current = _stamp(fd)
            actual = _hash_region(fd, layout.start, layout.length)
            with self._write() as conn:
                if actual != held.digest:
                    conn.execute(delete(_PIECES).where(_PIECES.c.task_id == task_id, _PIECES.c.number == number))
                    conn.execute(update(_TASKS).where(_TASKS.c.task_id == task_id).values(completed=False))
                    return _CORRUPT, actual
                epoch = task.stamp_epoch
                if current != task.file_stamp:
                    # The file changed outside the store since its last write: every other piece must be
                    # re-verified too, so a new epoch starts from what the file is now.
                    epoch += 1
                    conn.execute(
                        update(_TASKS).where(_TASKS.c.task_id == task_id).values(file_stamp=current, stamp_epoch=epoch)
                    )
                conn.execute(
                    update(_PIECES)
                    .where(_PIECES.c.task_id == task_id, _PIECES.c.number == number)
                    .values(verified_stamp=current, verified_epoch=epoch)
                )
            return _SOUND, actual

    def open_piece(self, task_id: str, number: int) -> OpenPiece:
        """An open, integrity-checked piece for serving without copying (the caller closes it).

        PieceNotFound when not held; DigestMismatch when it was corrupt (it has then been forgotten).
        The piece is hashed only when the data file changed behind the store's back (module docstring).
        """
        validate_task_id(task_id)
        return self._open_checked(task_id, [number])

    def open_range(self, task_id: str, start: int, end_inclusive: int) -> OpenPiece:
        """An open descriptor for bytes ``start..end_inclusive``, every piece under them held and checked.

        PieceNotFound when any covered piece is not held, DigestMismatch when one was corrupt (and has
        been forgotten); ``digest`` is the first covered piece's.
        """
        validate_task_id(task_id)
        with self._read() as conn:
            task = self._require_task(conn, task_id)
        if not 0 <= start <= end_inclusive < task.content_length:
            raise InvalidRequest(f"range {start}-{end_inclusive} is outside task {task_id}", task_id=task_id)
        opened = self._open_checked(task_id, list(pieces_covering(start, end_inclusive, task.piece_size)))
        opened.offset, opened.length = start, end_inclusive - start + 1
        return opened

    def _open_checked(self, task_id: str, numbers: list[int]) -> OpenPiece:
        """Open the data file and check consecutive pieces ``numbers`` against its stat stamp."""
        with self._read() as conn:
            task = self._require_task(conn, task_id)
            rows = conn.execute(
                select(_PIECES).where(_PIECES.c.task_id == task_id, _PIECES.c.number.between(numbers[0], numbers[-1]))
            ).all()
        layouts = [self._layout(task, number) for number in numbers]
        by_number = {row.number: row for row in rows}
        for number in numbers:
            if number not in by_number:
                raise PieceNotFound(f"piece {number} of task {task_id} is not held", task_id=task_id, piece=number)
        try:
            fd = os.open(self.data_path(task_id), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise PieceNotFound(f"task {task_id} was deleted", task_id=task_id, piece=numbers[0]) from exc
        try:
            # Stamped through this descriptor, so what is checked is what will be read.
            current = _stamp(fd)
            for number in numbers:
                row = by_number[number]
                trusted = current == row.verified_stamp or (
                    current == task.file_stamp and row.verified_epoch == task.stamp_epoch
                )
                if trusted:
                    continue
                status, actual = self._verify(task_id, number)
                if status == _MISSING:
                    raise PieceNotFound(f"piece {number} of task {task_id} is not held", task_id=task_id, piece=number)
                if status == _CORRUPT:
                    raise DigestMismatch(row.digest, actual or "", what=f"piece {number} of task {task_id} on disk")
        except BaseException:
            os.close(fd)
            raise
        start = layouts[0].start
        return OpenPiece(fd=fd, offset=start, length=layouts[-1].end - start, digest=by_number[numbers[0]].digest)

    def piece_file_range(self, task_id: str, number: int) -> tuple[Path, int, int]:
        """(data file, offset, length) of a held, integrity-checked piece; PieceNotFound if not held."""
        with self.open_piece(task_id, number) as opened:
            return self.data_path(task_id), opened.offset, opened.length

    # --- waiting -------------------------------------------------------------------------------------

    def _wake(self, task_id: str, number: int) -> None:
        with self._waiters_lock:
            waiters = self._waiters.pop((task_id, number), [])
        for loop, waiter in waiters:
            with contextlib.suppress(RuntimeError):  # That loop has closed; nobody is waiting any more.
                loop.call_soon_threadsafe(waiter.set)

    async def wait_for_piece(self, task_id: str, number: int, timeout: float) -> bool:
        """Wait until the piece is held (written by this or another process); False after ``timeout`` s.

        A write through this store instance wakes the waiter at once; writes by other processes are seen
        by polling the database with a backoff from 5 ms to 50 ms.
        """
        validate_task_id(task_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        waiter = asyncio.Event()
        key = (task_id, number)
        with self._waiters_lock:
            self._waiters.setdefault(key, []).append((loop, waiter))
        try:
            delay = 0.005
            while True:
                if await asyncio.to_thread(self.has_piece, task_id, number):
                    return True
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.wait(), timeout=min(delay, remaining))
                delay = min(delay * 2, 0.05)
        finally:
            with self._waiters_lock:
                waiters = self._waiters.get(key, [])
                if (loop, waiter) in waiters:
                    waiters.remove((loop, waiter))
                if not waiters:
                    self._waiters.pop(key, None)

    # --- accounting and eviction ---------------------------------------------------------------------

    def usage(self) -> StoreUsage:
        """Bytes held (the sum of the held pieces' lengths), tasks and pieces."""
        with self._read() as conn:
            bytes_held, pieces = conn.execute(
                select(func.coalesce(func.sum(_PIECES.c.length), 0), func.count()).select_from(_PIECES)
            ).one()
            tasks = conn.execute(select(func.count()).select_from(_TASKS)).scalar_one()
        return StoreUsage(bytes_on_disk=int(bytes_held), task_count=int(tasks), piece_count=int(pieces))

    def collect_garbage(
        self,
        *,
        ttl_seconds: float,
        high_watermark_bytes: int,
        low_watermark_bytes: int,
        now: datetime | None = None,
    ) -> list[str]:
        """Evict tasks idle longer than the TTL, then LRU tasks while over the high watermark; return their ids.

        Eviction by size stops once the store is at or under the low watermark. A task written (or
        opened) within the last ``write_grace_seconds`` is never evicted: a download is under way.
        """
        if low_watermark_bytes > high_watermark_bytes:
            raise InvalidRequest("the low watermark must not exceed the high watermark")
        at = (now or datetime.now(UTC)).timestamp()
        expired_before = at - ttl_seconds
        busy_after = at - self.write_grace_seconds
        sizes = (
            select(_PIECES.c.task_id, func.sum(_PIECES.c.length).label("held")).group_by(_PIECES.c.task_id).subquery()
        )
        with self._read() as conn:
            rows = conn.execute(
                select(
                    _TASKS.c.task_id,
                    _TASKS.c.last_access_at,
                    _TASKS.c.last_write_at,
                    func.coalesce(sizes.c.held, 0).label("held"),
                )
                .select_from(_TASKS.outerjoin(sizes, sizes.c.task_id == _TASKS.c.task_id))
                .order_by(_TASKS.c.last_access_at, _TASKS.c.task_id)
            ).all()
        self._sweep_orphans({row.task_id for row in rows}, busy_after)
        usage = sum(int(row.held) for row in rows)
        evicted: list[str] = []
        for row in rows:
            if row.last_access_at < expired_before and row.last_write_at <= busy_after:
                # Re-checked under the lock: a touch or a write since we looked keeps the task.
                condition = (_TASKS.c.last_access_at < expired_before) & (_TASKS.c.last_write_at <= busy_after)
                if self._evict(row.task_id, condition):
                    evicted.append(row.task_id)
                    usage -= int(row.held)
        if usage > high_watermark_bytes:
            gone = set(evicted)
            for row in rows:
                if usage <= low_watermark_bytes:
                    break
                if row.task_id in gone or row.last_write_at > busy_after:
                    continue
                condition = (_TASKS.c.last_access_at <= row.last_access_at) & (_TASKS.c.last_write_at <= busy_after)
                if self._evict(row.task_id, condition):
                    evicted.append(row.task_id)
                    usage -= int(row.held)
        return evicted

    def _sweep_orphans(self, known: set[str], busy_after: float) -> None:
        """Remove data files no task row accounts for (a crash between creating a file and recording it)."""
        for path in self.tasks_dir.glob("*/*.data"):
            candidate = path.name.removesuffix(".data")
            if candidate in known or not is_task_id(candidate) or path.parent.name != candidate[:3]:
                continue
            try:
                if path.stat().st_mtime > busy_after:
                    continue  # Probably being created right now; its row is on the way.
                with self._locked(candidate, create=False) as fd:
                    with self._read() as conn:
                        recorded = self._task_row(conn, candidate) is not None
                    if fd is not None and not recorded:
                        os.unlink(path)
                        logger.info("removed orphan data file %s", path)
            except (OSError, DependencyUnavailable):
                continue

    def _evict(self, task_id: str, condition: Any) -> bool:
        try:
            with self._locked(task_id, create=False) as fd:
                return self._delete_locked(task_id, fd, condition)
        except (OSError, SQLAlchemyError, DependencyUnavailable):
            # One task that cannot be removed right now must not stop the rest of the collection.
            return False
