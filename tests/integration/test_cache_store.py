"""The cache-store's upload server over a real piece store and NATS, in-process and as a real uvicorn process.

The tests write pieces through their own PieceStore on the service's storage directory, as the node's
registry-proxy or seed-fetcher would: the cache-store serves what other processes wrote.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import httpx
import nats
import orjson
import pytest
import yaml
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from services.cache_store.app import create_app
from services.cache_store.config import CacheStoreConfig
from services.cache_store.upload import TokenBucket
from shared.nats_server import NatsServer
from shared.piece_store import PieceStore
from shared.tasks import sha256_digest
from tests.support.ports import free_port
from tests.support.services import running, service_config
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

KIB = 1024
PIECE = 256 * KIB


def task_id(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def flip_byte(path: Path, offset: int) -> None:
    """Corrupt one byte in place, later than the last store write (past the file clock's tick)."""
    time.sleep(0.02)
    with path.open("r+b") as f:
        f.seek(offset)
        original = f.read(1)
        f.seek(offset)
        f.write(bytes([original[0] ^ 0xFF]))


def put_blob(store: PieceStore, name: str, data: bytes, piece_size: int = PIECE, skip: tuple[int, ...] = ()) -> str:
    """Write ``data`` as a task, every piece but ``skip``, as a downloading process would."""
    tid = task_id(name)
    store.open_task(tid, url=f"http://origin/{name}", content_length=len(data), piece_size=piece_size)
    for number in range(-(-len(data) // piece_size)):
        if number not in skip:
            store.write_piece(tid, number, data[number * piece_size : (number + 1) * piece_size])
    return tid


def metric(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"no metric {name}")


def make_app(tmp_path: Path, nats_url: str, **values: object) -> tuple[FastAPI, CacheStoreConfig]:
    values.setdefault("peer_id", "peer-cs")
    values.setdefault("upload_chunk_bytes", 64 * KIB)  # Several chunks per piece: the streaming loop runs.
    config = service_config(CacheStoreConfig, tmp_path / "cs", nats_url, **values)
    return create_app(config), config


WriterFactory = Callable[[CacheStoreConfig], PieceStore]


@pytest.fixture
def writer_factory() -> Iterator[WriterFactory]:
    """Opens PieceStores on a service's storage directory (the node's other processes); closed afterwards."""
    stores: list[PieceStore] = []

    def make(config: CacheStoreConfig) -> PieceStore:
        store = PieceStore(config.effective_storage_dir, config.effective_database_url)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


# --- in-process --------------------------------------------------------------------------------------------


async def test_pieces_are_served_exactly_with_their_digest(
    tmp_path: Path, nats_server: NatsServer, writer_factory: WriterFactory
) -> None:
    app, config = make_app(tmp_path, nats_server.url)
    async with running(app) as client:
        store = writer_factory(config)
        data = os.urandom(2 * PIECE + 1000)
        tid = put_blob(store, "a", data, skip=(1,))
        response = await client.get(f"/download/{tid}/pieces/0")
        assert response.status_code == 200
        assert response.content == data[:PIECE]
        assert response.headers["content-length"] == str(PIECE)
        assert response.headers["damselfly-piece-digest"] == sha256_digest(data[:PIECE])
        last = await client.get(f"/download/{tid}/pieces/2")
        assert last.content == data[2 * PIECE :] and last.headers["content-length"] == "1000"

        missing = await client.get(f"/download/{tid}/pieces/1")
        assert missing.status_code == 404 and missing.json()["error"] == "piece_not_found"
        beyond = await client.get(f"/download/{tid}/pieces/3")
        assert beyond.status_code == 400 and beyond.json()["error"] == "invalid_request"
        unknown = await client.get(f"/download/{task_id('unknown')}/pieces/0")
        assert unknown.status_code == 404 and unknown.json()["error"] == "task_not_found"
        for bad in ("x" * 64, tid.upper(), tid[:-1], tid + "0", "%2E%2E", tid + "%00"):
            answer = await client.get(f"/download/{bad}/pieces/0")
            assert answer.status_code == 400, bad
            assert answer.json()["error"] == "invalid_request"
        assert (await client.get(f"/download/{tid}/pieces/-1")).status_code == 400

        view = (await client.get(f"/api/v1/tasks/{tid}")).json()
        assert view["pieces"] == [0, 2] and view["piece_count"] == 3 and view["completed"] is False
        assert view["content_length"] == len(data) and view["piece_digests"]["0"] == sha256_digest(data[:PIECE])
        assert (await client.get(f"/api/v1/tasks/{task_id('nope')}")).status_code == 404
        assert (await client.get("/server/ping")).text == "pong"

        metrics = (await client.get("/metrics")).text
        assert metric(metrics, "damselfly_upload_pieces_served_total") == 2
        assert metric(metrics, "damselfly_upload_bytes_total") == PIECE + 1000
        assert metric(metrics, "damselfly_upload_slots_in_use") == 0


async def test_ranges_are_served_across_pieces(
    tmp_path: Path, nats_server: NatsServer, writer_factory: WriterFactory
) -> None:
    app, config = make_app(tmp_path, nats_server.url)
    async with running(app) as client:
        store = writer_factory(config)
        data = os.urandom(4 * PIECE + 77)
        tid = put_blob(store, "a", data, skip=(3,))

        async def get_range(spec: str | None) -> httpx.Response:
            return await client.get(f"/download/{tid}", headers={"Range": spec} if spec else {})

        for start, end in ((0, 0), (10, PIECE + 10), (PIECE - 1, PIECE), (5, 3 * PIECE - 1), (PIECE, 2 * PIECE - 1)):
            response = await get_range(f"bytes={start}-{end}")
            assert response.status_code == 206, (start, end)
            assert response.content == data[start : end + 1]
            assert response.headers["content-range"] == f"bytes {start}-{end}/{len(data)}"
        tail = await get_range("bytes=-50")  # The last 50 bytes: in piece 4, held.
        assert tail.status_code == 206 and tail.content == data[-50:]

        not_held = await get_range(f"bytes={2 * PIECE}-{3 * PIECE + 5}")  # Reaches into piece 3.
        assert not_held.status_code == 404 and not_held.json()["error"] == "piece_not_found"
        whole = await get_range(None)
        assert whole.status_code == 404  # The whole task needs every piece.
        for spec in (f"bytes={len(data)}-", "bytes=9-3", "bytes=abc", "items=0-1"):
            refused = await get_range(spec)
            assert refused.status_code == 416, spec
            assert refused.headers["content-range"] == f"bytes */{len(data)}"
        assert (await get_range("bytes=0-1,5-6")).status_code == 400

        store.write_piece(tid, 3, data[3 * PIECE : 4 * PIECE])
        whole = await get_range(None)
        assert whole.status_code == 200 and whole.content == data
        assert whole.headers["accept-ranges"] == "bytes"
        open_ended = await get_range(f"bytes={3 * PIECE - 3}-")
        assert open_ended.content == data[3 * PIECE - 3 :]

        empty = task_id("empty")
        store.open_task(empty, url="http://origin/empty", content_length=0, piece_size=PIECE)
        assert (await client.get(f"/download/{empty}")).content == b""
        assert (await client.get(f"/download/{empty}", headers={"Range": "bytes=0-0"})).status_code == 416
        assert (await client.get(f"/download/{task_id('nope')}")).status_code == 404
        assert (await client.get("/download/not-a-task")).status_code == 400


async def test_a_corrupt_piece_is_dropped_and_never_served(
    tmp_path: Path, nats_server: NatsServer, writer_factory: WriterFactory
) -> None:
    app, config = make_app(tmp_path, nats_server.url)
    async with running(app) as client:
        store = writer_factory(config)
        data = os.urandom(3 * PIECE)
        tid = put_blob(store, "a", data)
        assert (await client.get(f"/download/{tid}/pieces/1")).content == data[PIECE : 2 * PIECE]
        flip_byte(store.data_path(tid), PIECE + 123)

        corrupt = await client.get(f"/download/{tid}/pieces/1")
        assert corrupt.status_code == 404 and corrupt.json()["error"] == "piece_not_found"
        assert (await client.get(f"/api/v1/tasks/{tid}")).json()["pieces"] == [0, 2]
        assert not store.has_piece(tid, 1)  # The writer's side sees it gone too: it is fetched again.
        # The others were re-verified once (the file changed) and are still served, exactly.
        assert (await client.get(f"/download/{tid}/pieces/2")).content == data[2 * PIECE :]
        assert (await client.get(f"/download/{tid}", headers={"Range": "bytes=0-9"})).content == data[:10]

        # Corruption found through a range read is dropped the same way.
        flip_byte(store.data_path(tid), 2 * PIECE + 1)
        ranged = await client.get(f"/download/{tid}", headers={"Range": f"bytes={2 * PIECE}-{2 * PIECE + 10}"})
        assert ranged.status_code == 404
        assert store.held_pieces(tid).keys() == {0}
        metrics = (await client.get("/metrics")).text
        assert metric(metrics, "damselfly_cache_corrupt_pieces_dropped_total") == 2


async def test_upload_slots_and_rate_limit(
    tmp_path: Path, nats_server: NatsServer, writer_factory: WriterFactory
) -> None:
    rate = 1024 * KIB
    app, config = make_app(tmp_path, nats_server.url, upload_slots=1, upload_rate_limit_bytes=rate)
    async with running(app) as client:
        store = writer_factory(config)
        data = os.urandom(6 * PIECE)
        tid = put_blob(store, "a", data, piece_size=3 * PIECE)  # Two 768 KiB pieces.
        # The bucket starts full with one second's worth (1 MiB): the first piece comes from the burst,
        # the second is paced, so both together take at least (1536 - 1024) KiB / 1 MiB/s = 0.5 s.
        started = time.monotonic()
        assert (await client.get(f"/download/{tid}/pieces/0")).status_code == 200
        slow = asyncio.create_task(client.get(f"/download/{tid}/pieces/1"))
        await eventually(lambda: _slots_in_use_is(app, 1))
        busy = await client.get(f"/download/{tid}/pieces/0")
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"] == "dependency_unavailable"
        busy_range = await client.get(f"/download/{tid}", headers={"Range": "bytes=0-9"})
        assert busy_range.status_code == 503
        response = await slow
        elapsed = time.monotonic() - started
        assert response.content == data[3 * PIECE :]
        assert 0.45 < elapsed < 10, elapsed
        assert app.state.uploader.slots.in_use == 0
        assert (await client.get(f"/download/{tid}/pieces/0")).status_code == 200  # The slot is free again.
        metrics = (await client.get("/metrics")).text
        assert metric(metrics, "damselfly_upload_rejected_total") == 2


async def _slots_in_use_is(app: FastAPI, count: int) -> bool:
    return bool(app.state.uploader.slots.in_use == count)


async def test_token_bucket_paces_to_its_rate() -> None:
    bucket = TokenBucket(rate=100_000, capacity=10_000)
    started = time.monotonic()
    for _ in range(5):
        await bucket.take(10_000)  # 50 KB: the first 10 KB from the burst, 40 KB at 100 KB/s.
    assert 0.35 < time.monotonic() - started < 1.5


async def test_gc_evicts_in_the_background_and_heartbeats_carry_the_load(
    tmp_path: Path, nats_server: NatsServer, writer_factory: WriterFactory
) -> None:
    app, config = make_app(
        tmp_path,
        nats_server.url,
        heartbeat_interval_seconds=0.1,
        gc_interval_seconds=0.1,
        gc_ttl_seconds=3600,
        gc_write_grace_seconds=0,
        disk_high_watermark_bytes=3 * PIECE,
        disk_low_watermark_bytes=2 * PIECE,
    )
    connection = await nats.connect(nats_server.url)
    heartbeats: list[dict[str, object]] = []

    async def on_heartbeat(message: nats.aio.msg.Msg) -> None:
        heartbeats.append(orjson.loads(message.data))

    await connection.subscribe("damselfly.v1.peer.heartbeat.peer-cs", cb=on_heartbeat)
    try:
        async with running(app) as client:
            await eventually(lambda: _ready(client))
            store = writer_factory(config)
            first = put_blob(store, "first", os.urandom(2 * PIECE))
            await eventually(lambda: _heartbeat_says(heartbeats, tasks_held=1))
            second = put_blob(store, "second", os.urandom(2 * PIECE))  # 4 pieces held: over the watermark.

            async def first_evicted() -> bool:
                return store.get_task(first) is None

            await eventually(first_evicted)
            assert store.get_task(second) is not None  # The most recently used one stays.
            assert not store.data_path(first).exists()
            await eventually(lambda: _heartbeat_says(heartbeats, tasks_held=1))
            metrics = (await client.get("/metrics")).text
            assert metric(metrics, "damselfly_cache_evictions_total") == 1
            assert metric(metrics, "damselfly_cache_disk_usage_bytes") == 2 * PIECE
            ready = (await client.get("/readyz")).json()
            assert ready["checks"]["database"] is True
    finally:
        await connection.close()


async def _ready(client: httpx.AsyncClient) -> bool:
    return (await client.get("/readyz")).status_code == 200


async def _heartbeat_says(heartbeats: list[dict[str, object]], tasks_held: int) -> bool:
    return bool(heartbeats) and heartbeats[-1]["tasks_held"] == tasks_held


# --- a real uvicorn server ---------------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path, nats_server: NatsServer) -> Iterator[tuple[str, PieceStore]]:
    """The cache-store as `python -m services.cache_store` (uvloop, httptools), and a writer on its store."""
    port = free_port()
    storage = tmp_path / "node" / "pieces"
    config_file = tmp_path / "cache-store.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "port": port,
                "workdir": str(tmp_path / "node"),
                "storage_dir": str(storage),
                "peer_id": "peer-uvicorn",
                "upload_slots": 2,
                # Slow enough that two 4 MiB pieces take over a second even from a full bucket (4 MiB).
                "upload_rate_limit_bytes": 4 * 1024 * KIB,
                "nats": {"url": nats_server.url, "connect_timeout": 1.0},
                "telemetry": {"log_level": "WARNING"},
            }
        )
    )
    log_path = tmp_path / "cache-store.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.cache_store", "--config", str(config_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
        )
    base = f"http://127.0.0.1:{port}"
    store = PieceStore(storage)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the cache-store did not become ready\n" + log_path.read_text()
            time.sleep(0.1)
        yield base, store
    finally:
        store.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def test_a_real_uvicorn_server_streams_pieces_and_ranges(served: tuple[str, PieceStore]) -> None:
    base, store = served
    piece_size = 4 * 1024 * KIB
    data = os.urandom(2 * piece_size + 12345)
    tid = put_blob(store, "big", data, piece_size=piece_size)
    async with aiohttp.ClientSession(base) as session:
        for number in range(3):
            async with session.get(f"/download/{tid}/pieces/{number}") as response:
                assert response.status == 200
                body = await response.read()
                assert body == data[number * piece_size : (number + 1) * piece_size]
                assert response.headers["Damselfly-Piece-Digest"] == sha256_digest(body)
        start, end = piece_size - 100, 2 * piece_size + 99
        async with session.get(f"/download/{tid}", headers={"Range": f"bytes={start}-{end}"}) as response:
            assert response.status == 206
            assert await response.read() == data[start : end + 1]
        async with session.get(f"/download/{tid}", headers={"Range": f"bytes={len(data)}-"}) as response:
            assert response.status == 416
        async with session.get(f"/download/{'z' * 64}/pieces/0") as response:
            assert response.status == 400 and (await response.json())["error"] == "invalid_request"
        async with session.get(f"/download/{task_id('none')}/pieces/0") as response:
            assert response.status == 404

        flip_byte(store.data_path(tid), 5)
        async with session.get(f"/download/{tid}/pieces/0") as response:
            assert response.status == 404
        assert not store.has_piece(tid, 0)

        # Two slots: two paced downloads (8 MiB at 4 MiB/s) hold them, a third is turned away.
        async with session.get(f"/download/{tid}") as response:
            assert response.status == 404  # Piece 0 is gone, so the whole task is not here.
        uploaded_before = await uploaded_bytes(session)
        first = await session.get(f"/download/{tid}/pieces/1")
        second = await session.get(f"/download/{tid}/pieces/1")
        async with session.get(f"/download/{tid}/pieces/2") as refused:
            assert refused.status == 503 and refused.headers["Retry-After"] == "1"
        # A client that goes away mid-piece gives its slot back, and the server stops sending to it.
        first.close()
        assert await second.read() == data[piece_size : 2 * piece_size]
        second.release()

        async def slots_free() -> bool:
            return metric(await (await session.get("/metrics")).text(), "damselfly_upload_slots_in_use") == 0

        await eventually(slots_free)
        sent_for_both = await uploaded_bytes(session) - uploaded_before
        assert piece_size <= sent_for_both < 2 * piece_size  # All of the second piece, part of the first.
        async with session.get(f"/download/{tid}/pieces/2") as response:
            assert response.status == 200 and await response.read() == data[2 * piece_size :]


async def uploaded_bytes(session: aiohttp.ClientSession) -> float:
    async with session.get("/metrics") as response:
        return metric(await response.text(), "damselfly_upload_bytes_total")
