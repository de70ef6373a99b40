"""The piece store on a real file system and SQLite: layout, integrity, several processes, eviction."""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from blake3 import blake3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import DigestMismatch, InvalidRequest, PieceNotFound, TaskNotFound
from shared.piece_store import PieceStore, StoreUsage
from shared.tasks import sha256_digest

PIECE = 1024  # Small pieces keep the tests fast; the arithmetic is the same as with 4 MiB.


def task_id(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def blob(size: int, seed: int = 0) -> bytes:
    return bytes((i * 131 + seed * 7 + i // 251) % 256 for i in range(size))


def pieces_of(data: bytes, piece_size: int = PIECE) -> list[bytes]:
    return [data[i : i + piece_size] for i in range(0, len(data), piece_size)]


def flip_byte(path: Path, offset: int) -> None:
    """Corrupt one byte in place, as a failing disk or a stray process would."""
    with path.open("r+b") as f:
        f.seek(offset)
        original = f.read(1)
        f.seek(offset)
        f.write(bytes([original[0] ^ 0xFF]))


@pytest.fixture
def store(tmp_path: Path) -> PieceStore:
    s = PieceStore(tmp_path / "store")
    yield s
    s.close()


def open_blob(store: PieceStore, name: str, data: bytes, piece_size: int = PIECE) -> str:
    tid = task_id(name)
    store.open_task(tid, url=f"http://origin/{name}", content_length=len(data), piece_size=piece_size)
    return tid


# --- tasks ---------------------------------------------------------------------------------------------


def test_open_task_creates_one_sparse_file_of_the_blob_length(store: PieceStore) -> None:
    tid = task_id("a")
    task = store.open_task(tid, url="http://origin/a", content_length=5 * PIECE + 10, piece_size=PIECE)
    assert (task.piece_count, task.completed, task.digest) == (6, False, None)
    path = store.data_path(tid)
    assert path == store.root / "tasks" / tid[:3] / f"{tid}.data"
    assert path.stat().st_size == 5 * PIECE + 10
    assert path.stat().st_blocks == 0  # Sparse: nothing written yet.
    assert store.get_task(tid) == task
    assert store.held_pieces(tid) == {}


def test_open_task_is_idempotent_but_refuses_another_layout(store: PieceStore) -> None:
    tid = task_id("a")
    first = store.open_task(tid, url="http://origin/a", content_length=3000, piece_size=PIECE)
    store.write_piece(tid, 0, blob(3000)[:PIECE])
    again = store.open_task(
        tid, url="http://mirror/a", content_length=3000, piece_size=PIECE, digest="sha256:" + "0" * 64
    )
    assert again.url == first.url and again.digest == "sha256:" + "0" * 64  # Digest learnt; first URL kept.
    assert store.has_piece(tid, 0)  # Re-opening keeps what is held.
    with pytest.raises(InvalidRequest):
        store.open_task(tid, url="http://origin/a", content_length=3001, piece_size=PIECE)
    with pytest.raises(InvalidRequest):
        store.open_task(tid, url="http://origin/a", content_length=3000, piece_size=2 * PIECE)
    with pytest.raises(InvalidRequest):
        store.open_task(tid, url="http://origin/a", content_length=3000, piece_size=PIECE, digest="sha256:" + "1" * 64)


def test_empty_blob_has_no_pieces_and_is_complete(store: PieceStore) -> None:
    tid = task_id("empty")
    task = store.open_task(tid, url="http://origin/empty", content_length=0, piece_size=PIECE)
    assert (task.piece_count, task.completed) == (0, True)
    assert store.held_pieces(tid) == {}
    store.mark_completed(tid)
    assert store.usage() == StoreUsage(bytes_on_disk=0, task_count=1, piece_count=0)


@pytest.mark.parametrize(
    "hostile",
    [
        "../" * 20 + "etc/passwd",
        "a" * 63,
        "a" * 65,
        "A" * 64,
        "a" * 64 + "\n",
        "/" + "a" * 63,
        "..%2f" + "a" * 59,
        "a" * 62 + "/.",
        "",
        "g" * 64,
    ],
)
def test_hostile_task_ids_are_rejected_before_touching_the_file_system(store: PieceStore, hostile: str) -> None:
    before = sorted(store.root.rglob("*"))
    for call in (
        lambda: store.open_task(hostile, url="http://x", content_length=10, piece_size=PIECE),
        lambda: store.get_task(hostile),
        lambda: store.write_piece(hostile, 0, b"x"),
        lambda: store.read_piece(hostile, 0),
        lambda: store.delete_task(hostile),
        lambda: store.data_path(hostile),
        lambda: store.piece_file_range(hostile, 0),
    ):
        with pytest.raises(InvalidRequest):
            call()
    assert sorted(store.root.rglob("*")) == before


def test_unknown_task(store: PieceStore) -> None:
    tid = task_id("nope")
    assert store.get_task(tid) is None
    assert not store.has_piece(tid, 0)
    with pytest.raises(TaskNotFound):
        store.write_piece(tid, 0, b"x")
    with pytest.raises(TaskNotFound):
        store.read_piece(tid, 0)
    store.delete_task(tid)  # Deleting what is not there is not an error.


# --- pieces --------------------------------------------------------------------------------------------


def test_write_and_read_pieces_with_a_shorter_last_piece(store: PieceStore) -> None:
    data = blob(3 * PIECE + 100)
    tid = open_blob(store, "a", data)
    for number, piece in enumerate(pieces_of(data)):
        assert store.write_piece(tid, number, piece) == sha256_digest(piece)
    assert store.held_pieces(tid) == {n: sha256_digest(p) for n, p in enumerate(pieces_of(data))}
    assert len(store.read_piece(tid, 3)) == 100
    assert b"".join(store.read_piece(tid, n) for n in range(4)) == data
    assert store.data_path(tid).read_bytes() == data  # One copy, at the blob's own offsets.
    path, offset, length = store.piece_file_range(tid, 3)
    assert (path, offset, length) == (store.data_path(tid), 3 * PIECE, 100)
    store.mark_completed(tid)
    assert store.get_task(tid).completed  # type: ignore[union-attr]
    assert store.usage() == StoreUsage(bytes_on_disk=len(data), task_count=1, piece_count=4)


def test_wrong_length_piece_is_rejected(store: PieceStore) -> None:
    data = blob(2 * PIECE + 10)
    tid = open_blob(store, "a", data)
    with pytest.raises(InvalidRequest):
        store.write_piece(tid, 0, data[: PIECE - 1])
    with pytest.raises(InvalidRequest):
        store.write_piece(tid, 2, data[2 * PIECE :] + b"x")  # The last piece is exactly 10 bytes.
    with pytest.raises(InvalidRequest):
        store.write_piece(tid, 3, b"x")  # No such piece.
    assert store.held_pieces(tid) == {}


def test_digest_mismatch_stores_nothing(store: PieceStore) -> None:
    data = blob(2 * PIECE)
    tid = open_blob(store, "a", data)
    with pytest.raises(DigestMismatch) as caught:
        store.write_piece(tid, 1, data[PIECE:], expected_digest=sha256_digest(b"something else"))
    assert caught.value.actual == sha256_digest(data[PIECE:])
    assert not store.has_piece(tid, 1)
    assert store.data_path(tid).read_bytes() == bytes(2 * PIECE)  # Not even the bytes were written.
    piece = data[PIECE:]
    assert store.write_piece(tid, 1, piece, expected_digest=sha256_digest(piece)) == sha256_digest(piece)
    # A blake3 announcement is checked with blake3; the store still records sha256.
    assert store.write_piece(tid, 0, data[:PIECE], "blake3:" + blake3(data[:PIECE]).hexdigest()) == sha256_digest(
        data[:PIECE]
    )


def test_writes_are_idempotent(store: PieceStore) -> None:
    data = blob(2 * PIECE)
    tid = open_blob(store, "a", data)
    digest = store.write_piece(tid, 0, data[:PIECE])
    mtime = store.data_path(tid).stat().st_mtime_ns
    time.sleep(0.01)
    assert store.write_piece(tid, 0, memoryview(data)[:PIECE]) == digest
    assert store.data_path(tid).stat().st_mtime_ns == mtime  # Not rewritten.
    with pytest.raises(DigestMismatch):
        store.write_piece(tid, 0, blob(PIECE, seed=9))  # Other bytes for a held piece: a conflict, not a no-op.
    assert store.read_piece(tid, 0) == data[:PIECE]


def test_read_missing_piece(store: PieceStore) -> None:
    tid = open_blob(store, "a", blob(2 * PIECE))
    with pytest.raises(PieceNotFound):
        store.read_piece(tid, 1)
    with pytest.raises(PieceNotFound):
        store.piece_file_range(tid, 1)
    with pytest.raises(InvalidRequest):
        store.mark_completed(tid)  # Not every piece is held.


def test_corrupt_piece_on_disk_is_detected_and_forgotten(store: PieceStore) -> None:
    data = blob(3 * PIECE)
    tid = open_blob(store, "a", data)
    for number, piece in enumerate(pieces_of(data)):
        store.write_piece(tid, number, piece)
    store.mark_completed(tid)
    flip_byte(store.data_path(tid), PIECE + 5)
    with pytest.raises(DigestMismatch):
        store.read_piece(tid, 1)
    assert set(store.held_pieces(tid)) == {0, 2}  # Forgotten, so it is fetched again.
    assert not store.get_task(tid).completed  # type: ignore[union-attr]
    assert store.read_piece(tid, 0) == data[:PIECE]
    store.write_piece(tid, 1, data[PIECE : 2 * PIECE])  # Refetched: sound again.
    assert store.read_piece(tid, 1) == data[PIECE : 2 * PIECE]


def test_serving_path_rehashes_only_after_the_file_changed_behind_the_store(store: PieceStore) -> None:
    data = blob(3 * PIECE)
    tid = open_blob(store, "a", data)
    for number, piece in enumerate(pieces_of(data)):
        store.write_piece(tid, number, piece)
    with store.open_piece(tid, 0) as opened:
        assert os.pread(opened.fd, opened.length, opened.offset) == data[:PIECE]
        assert opened.digest == sha256_digest(data[:PIECE])
    # Corruption comes later than the last store write (past the file clock's tick), as it would.
    time.sleep(0.02)
    flip_byte(store.data_path(tid), 2 * PIECE)
    with pytest.raises(DigestMismatch):
        store.open_piece(tid, 2)
    assert not store.has_piece(tid, 2)
    # The other pieces are re-verified once (the file changed), found sound and served.
    with store.open_piece(tid, 1) as opened:
        assert os.pread(opened.fd, opened.length, opened.offset) == data[PIECE : 2 * PIECE]
    with pytest.raises(PieceNotFound):
        store.open_range(tid, 0, 3 * PIECE - 1)  # Covers the dropped piece.
    with store.open_range(tid, 10, 2 * PIECE - 1) as opened:
        assert (opened.offset, opened.length) == (10, 2 * PIECE - 10)


def test_verify_piece(store: PieceStore) -> None:
    data = blob(2 * PIECE)
    tid = open_blob(store, "a", data)
    store.write_piece(tid, 0, data[:PIECE])
    assert store.verify_piece(tid, 0)
    assert not store.verify_piece(tid, 1)  # Not held.
    flip_byte(store.data_path(tid), 3)
    assert not store.verify_piece(tid, 0)
    assert store.held_pieces(tid) == {}


def test_a_data_file_deleted_behind_the_store_loses_its_pieces(store: PieceStore) -> None:
    data = blob(2 * PIECE)
    tid = open_blob(store, "a", data)
    store.write_piece(tid, 0, data[:PIECE])
    store.data_path(tid).unlink()
    with pytest.raises(PieceNotFound):
        store.piece_file_range(tid, 0)
    # The next write re-creates the file; the piece it held is gone with the old file.
    store.write_piece(tid, 1, data[PIECE:])
    assert store.held_pieces(tid) == {1: sha256_digest(data[PIECE:])}
    assert store.read_piece(tid, 1) == data[PIECE:]


def test_delete_task(store: PieceStore) -> None:
    data = blob(2 * PIECE)
    tid = open_blob(store, "a", data)
    store.write_piece(tid, 0, data[:PIECE])
    store.delete_task(tid)
    assert store.get_task(tid) is None
    assert not store.data_path(tid).exists()
    assert store.usage() == StoreUsage(0, 0, 0)
    with pytest.raises(TaskNotFound):
        store.write_piece(tid, 1, data[PIECE:])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.integers(min_value=1, max_value=3000),
    piece_size=st.sampled_from([97, 256, 1000, 4096]),  # Up to 31 pieces: enough orders, quick examples.
    data=st.data(),
)
def test_any_write_order_produces_the_exact_blob(
    tmp_path: Path, size: int, piece_size: int, data: st.DataObject
) -> None:
    content = os.urandom(size)
    count = -(-size // piece_size)
    order = data.draw(st.permutations(range(count)))
    repeats = data.draw(st.lists(st.sampled_from(range(count)), max_size=3))
    store = PieceStore(tmp_path / f"store-{os.urandom(4).hex()}")
    try:
        tid = task_id(content.hex()[:32])
        store.open_task(tid, url="http://origin/x", content_length=size, piece_size=piece_size)
        for number in [*order, *repeats]:
            piece = content[number * piece_size : (number + 1) * piece_size]
            store.write_piece(tid, number, piece, expected_digest=sha256_digest(piece))
        store.mark_completed(tid)
        assert store.data_path(tid).read_bytes() == content
        assert b"".join(store.read_piece(tid, n) for n in range(count)) == content
        assert store.usage().bytes_on_disk == size
    finally:
        store.close()


# --- several processes ---------------------------------------------------------------------------------


def test_two_instances_on_one_root_see_each_others_writes(tmp_path: Path) -> None:
    writer, server = PieceStore(tmp_path / "s"), PieceStore(tmp_path / "s")
    try:
        data = blob(2 * PIECE)
        tid = open_blob(writer, "a", data)
        assert server.get_task(tid) is not None
        writer.write_piece(tid, 1, data[PIECE:])
        assert server.held_pieces(tid) == {1: sha256_digest(data[PIECE:])}
        assert server.read_piece(tid, 1) == data[PIECE:]
        server.open_task(tid, url="http://origin/a", content_length=len(data), piece_size=PIECE)  # Same task.
        server.write_piece(tid, 0, data[:PIECE])
        with writer.open_range(tid, 0, len(data) - 1) as opened:
            assert os.pread(opened.fd, opened.length, opened.offset) == data
        server.delete_task(tid)
        assert writer.get_task(tid) is None
    finally:
        writer.close()
        server.close()


async def test_wait_for_piece_wakes_when_another_instance_writes(tmp_path: Path) -> None:
    waiter, writer = PieceStore(tmp_path / "s"), PieceStore(tmp_path / "s")
    try:
        data = blob(2 * PIECE)
        tid = open_blob(writer, "a", data)
        assert not await waiter.wait_for_piece(tid, 0, timeout=0.05)

        async def write_later() -> None:
            await asyncio.sleep(0.1)
            await asyncio.to_thread(writer.write_piece, tid, 0, data[:PIECE])

        started = time.monotonic()
        writing = asyncio.create_task(write_later())
        assert await waiter.wait_for_piece(tid, 0, timeout=5)
        assert time.monotonic() - started < 1.0
        await writing

        # Through the same instance the waiter is woken directly.
        same = asyncio.create_task(writer.wait_for_piece(tid, 1, timeout=5))
        await asyncio.sleep(0.02)
        await asyncio.to_thread(writer.write_piece, tid, 1, data[PIECE:])
        assert await same
        assert await writer.wait_for_piece(tid, 1, timeout=0)  # Already held.
    finally:
        waiter.close()
        writer.close()


def _write_in_another_process(root: str, tid: str, numbers: list[int], size: int) -> None:
    store = PieceStore(Path(root))
    content = blob(size)
    for number in numbers:
        store.write_piece(tid, number, content[number * PIECE : (number + 1) * PIECE])
    store.close()


def test_processes_writing_one_task_at_once_make_the_exact_blob(tmp_path: Path) -> None:
    size = 40 * PIECE + 33
    content = blob(size)
    store = PieceStore(tmp_path / "s")
    try:
        tid = open_blob(store, "shared", content)
        count = 41
        context = multiprocessing.get_context("spawn")
        # Two processes and this one write overlapping sets of pieces at the same time.
        workers = [
            context.Process(target=_write_in_another_process, args=(str(store.root), tid, list(range(count)), size)),
            context.Process(
                target=_write_in_another_process, args=(str(store.root), tid, list(reversed(range(count))), size)
            ),
        ]
        for worker in workers:
            worker.start()
        for number in range(0, count, 3):
            store.write_piece(tid, number, content[number * PIECE : (number + 1) * PIECE])
        for worker in workers:
            worker.join(timeout=60)
            assert worker.exitcode == 0
        assert len(store.held_pieces(tid)) == count
        store.mark_completed(tid)
        assert store.data_path(tid).read_bytes() == content
        # Every piece is served without a re-hash being needed to find it sound, and is exact.
        for number in range(count):
            with store.open_piece(tid, number) as opened:
                assert (
                    os.pread(opened.fd, opened.length, opened.offset) == content[number * PIECE : (number + 1) * PIECE]
                )
    finally:
        store.close()


# --- eviction ------------------------------------------------------------------------------------------


def fill(store: PieceStore, name: str, pieces: int) -> str:
    data = blob(pieces * PIECE, seed=len(name))
    tid = open_blob(store, name, data)
    for number, piece in enumerate(pieces_of(data)):
        store.write_piece(tid, number, piece)
    store.mark_completed(tid)
    return tid


def test_gc_evicts_tasks_idle_longer_than_the_ttl(tmp_path: Path) -> None:
    store = PieceStore(tmp_path / "s", touch_interval_seconds=0, write_grace_seconds=0)
    try:
        old, read_lately = fill(store, "old", 2), fill(store, "read lately", 2)
        big = 10**9  # Watermarks out of the way: only the TTL evicts here.
        assert store.collect_garbage(ttl_seconds=0.3, high_watermark_bytes=big, low_watermark_bytes=big) == []
        time.sleep(0.4)
        store.touch(read_lately)
        evicted = store.collect_garbage(ttl_seconds=0.3, high_watermark_bytes=big, low_watermark_bytes=big)
        assert evicted == [old]
        assert store.get_task(old) is None and not store.data_path(old).exists()
        assert store.get_task(read_lately) is not None
        # `now` lets a caller judge at another time: an hour on, the other one has expired too.
        later = datetime.now(UTC) + timedelta(hours=1)
        assert store.collect_garbage(ttl_seconds=60, high_watermark_bytes=big, low_watermark_bytes=big, now=later) == [
            read_lately
        ]
    finally:
        store.close()


def test_gc_evicts_least_recently_used_tasks_down_to_the_low_watermark(tmp_path: Path) -> None:
    store = PieceStore(tmp_path / "s", touch_interval_seconds=0, write_grace_seconds=0)
    try:
        a, b, c, d = (fill(store, name, 2) for name in "abcd")  # 2 KiB each, 8 KiB in all.
        for tid in (c, a, d, b):  # LRU order now: c, a, d, b.
            time.sleep(0.002)
            store.touch(tid)
        assert store.usage().bytes_on_disk == 8 * PIECE
        # Under the high watermark: nothing goes.
        assert store.collect_garbage(ttl_seconds=3600, high_watermark_bytes=8 * PIECE, low_watermark_bytes=0) == []
        # Over it: the least recently used go until the store is at or under the low watermark.
        evicted = store.collect_garbage(ttl_seconds=3600, high_watermark_bytes=7 * PIECE, low_watermark_bytes=4 * PIECE)
        assert evicted == [c, a]
        assert store.usage() == StoreUsage(bytes_on_disk=4 * PIECE, task_count=2, piece_count=4)
    finally:
        store.close()


def test_gc_never_evicts_a_task_being_written(tmp_path: Path) -> None:
    store = PieceStore(tmp_path / "s", write_grace_seconds=30)
    try:
        busy = fill(store, "busy", 2)
        evicted = store.collect_garbage(ttl_seconds=0.001, high_watermark_bytes=0, low_watermark_bytes=0)
        assert evicted == []
        assert store.get_task(busy) is not None
        later = datetime.now(UTC) + timedelta(seconds=60)
        assert store.collect_garbage(ttl_seconds=1, high_watermark_bytes=0, low_watermark_bytes=0, now=later) == [busy]
        with pytest.raises(InvalidRequest):
            store.collect_garbage(ttl_seconds=1, high_watermark_bytes=1, low_watermark_bytes=2)
    finally:
        store.close()


def test_gc_removes_data_files_no_task_accounts_for(tmp_path: Path) -> None:
    store = PieceStore(tmp_path / "s", write_grace_seconds=5)
    try:
        kept = fill(store, "kept", 1)
        orphan = task_id("orphan")  # As a crash between creating a file and recording it would leave.
        path = store.data_path(orphan)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"left behind")
        stranger = store.tasks_dir / "not-ours.data"
        stranger.write_bytes(b"")
        assert store.collect_garbage(ttl_seconds=3600, high_watermark_bytes=10**9, low_watermark_bytes=0) == []
        assert path.exists()  # Too fresh: it may be a task being created right now.
        old = time.time() - 60
        os.utime(path, (old, old))
        store.collect_garbage(ttl_seconds=3600, high_watermark_bytes=10**9, low_watermark_bytes=0)
        assert not path.exists()
        assert store.data_path(kept).exists() and stranger.exists()
    finally:
        store.close()


def test_write_pieces_stores_the_good_ones_of_a_run_and_names_each_refused_one(store: PieceStore) -> None:
    data = blob(5 * PIECE)
    tid = open_blob(store, "run", data)
    parts = pieces_of(data)
    store.write_piece(tid, 1, parts[1])  # Held already, with the same bytes.
    written = store.write_pieces(
        tid,
        [
            (0, parts[0], sha256_digest(parts[0])),
            (1, parts[1], None),
            (2, parts[2], sha256_digest(b"something else")),  # Corrupt in transit.
            (3, memoryview(parts[3]), "blake3:" + blake3(parts[3]).hexdigest()),
        ],
    )
    assert written.stored == {n: sha256_digest(parts[n]) for n in (0, 1, 3)}
    assert list(written.failed) == [2] and isinstance(written.failed[2], DigestMismatch)
    assert sorted(store.held_pieces(tid)) == [0, 1, 3]
    assert [store.read_piece(tid, n) for n in (0, 1, 3)] == [parts[0], parts[1], parts[3]]
    # Other bytes for a held piece are refused too, and the held one stays.
    changed = store.write_pieces(tid, [(3, parts[4], None), (4, parts[4], None)])
    assert list(changed.failed) == [3] and changed.stored == {4: sha256_digest(parts[4])}
    assert store.read_piece(tid, 3) == parts[3]


def test_pieces_the_caller_has_just_hashed_are_not_hashed_again(
    store: PieceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shared.piece_store

    data = blob(3 * PIECE)
    tid = open_blob(store, "checked", data)
    parts = pieces_of(data)
    digests = [sha256_digest(part) for part in parts]
    hashed: list[int] = []

    def counting(data: bytes | memoryview) -> str:
        hashed.append(len(data))
        return sha256_digest(data)

    monkeypatch.setattr(shared.piece_store, "sha256_digest", counting)
    written = store.write_pieces(
        tid,
        [
            (0, parts[0], digests[0]),  # Hashed by the caller: taken as it is.
            (1, parts[1], digests[1]),  # Not in ``checked``: hashed here.
            (2, parts[2], "blake3:" + blake3(b"other").hexdigest()),  # Only sha256 is trusted: checked, refused.
        ],
        checked={0, 2},
    )
    assert written.stored == {0: digests[0], 1: digests[1]} and list(written.failed) == [2]
    assert hashed == [PIECE, PIECE]  # Pieces 1 and 2, not 0.
    assert store.read_piece(tid, 0) == parts[0]
    assert store.write_piece(tid, 2, parts[2], digests[2], checked=True) == digests[2]


def test_write_pieces_refuses_a_wrong_length_and_stores_nothing(store: PieceStore) -> None:
    data = blob(3 * PIECE)
    tid = open_blob(store, "short", data)
    with pytest.raises(InvalidRequest, match=r"piece 1 .* bytes"):
        store.write_pieces(tid, [(0, data[:PIECE], None), (1, data[PIECE : PIECE + 10], None)])
    assert store.held_pieces(tid) == {}
