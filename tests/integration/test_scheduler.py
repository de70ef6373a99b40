"""The piece-scheduler over real NATS: assignments, exactly one seed fetch, bad parents, restarts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from services.cache_store.app import create_app as create_cache_store
from services.cache_store.config import CacheStoreConfig
from services.piece_scheduler.app import create_app as create_scheduler
from services.piece_scheduler.config import SchedulerConfig
from shared.bus import MSG_ID_HEADER, Bus
from shared.nats_server import NatsServer
from shared.schemas import (
    AssignmentReply,
    AssignmentRequest,
    Event,
    PeerInfo,
    PeerRegistered,
    PieceAnnounced,
    PieceFailed,
    PieceFailureReason,
    PieceSource,
    SeedFetchCompleted,
    SeedFetchRequested,
    TaskRegistered,
    TaskStatus,
)
from shared.subjects import ALL_STREAMS, SEED_FETCH_REQUESTED, SEED_JOBS_STREAM
from shared.tasks import task_id_for_digest
from tests.support.services import running, service_config
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

BLOB = "sha256:" + "ab" * 32
TASK = task_id_for_digest(BLOB)
OTHER_TASK = task_id_for_digest("sha256:" + "cd" * 32)
URL = f"http://origin.test/v2/library/python/blobs/{BLOB}"
PIECE_SIZE = 1024 * 1024  # What piece_size_for gives a blob of CONTENT_LENGTH.
PIECES = 3
CONTENT_LENGTH = PIECE_SIZE * 2 + 1000

BusFactory = Callable[..., Awaitable[Bus]]


async def connect_bus(bus_factory: BusFactory) -> Bus:
    """The test's own connection (a peer or a seed would have one), with the streams declared."""
    bus = await bus_factory("test")
    await bus.ensure_streams(*ALL_STREAMS)
    return bus


@asynccontextmanager
async def scheduler(tmp_path: Path, nats_url: str, name: str = "s", **values: Any) -> AsyncIterator[FastAPI]:
    """A scheduler app in-process, ready (connected and replayed)."""
    app = create_scheduler(service_config(SchedulerConfig, tmp_path / name, nats_url, **values))
    async with running(app) as client:

        async def ready() -> bool:
            return (await client.get("/readyz")).status_code == 200

        await eventually(ready)
        app.state.client = client
        yield app


def peer(peer_id: str, **values: Any) -> PeerInfo:
    fields: dict[str, Any] = {
        "peer_id": peer_id,
        "node_name": peer_id,
        "ip": "127.0.0.1",
        "upload_url": f"http://{peer_id}.test:40901",
    }
    fields.update(values)
    return PeerInfo.model_validate(fields)


def piece_digest(number: int) -> str:
    return "sha256:" + format(number, "x").rjust(64, "0")


def announced(
    number: int, holder: str, *, task: str = TASK, parent: str | None = None, cost: float = 0.0
) -> PieceAnnounced:
    start = number * PIECE_SIZE
    return PieceAnnounced(
        task_id=task,
        piece_number=number,
        range_start=start,
        range_length=min(PIECE_SIZE, CONTENT_LENGTH - start),
        digest=piece_digest(number),
        holder=holder,
        source=PieceSource.PEER if parent else PieceSource.ORIGIN,
        parent_id=parent,
        cost_ms=cost,
    )


def registered(task: str = TASK) -> TaskRegistered:
    return TaskRegistered(
        task_id=task,
        url=URL,
        digest=BLOB,
        content_length=CONTENT_LENGTH,
        piece_size=PIECE_SIZE,
        piece_count=PIECES,
        registered_by="seed-0",
    )


def request(peer_id: str, task: str = TASK, **values: Any) -> AssignmentRequest:
    return AssignmentRequest(task_id=task, peer_id=peer_id, url=URL, digest=BLOB, **values)


async def publish(bus: Bus, *events: Event) -> None:
    for event in events:
        await bus.publish(event)


async def register(bus: Bus, *infos: PeerInfo) -> None:
    await publish(bus, *(PeerRegistered(peer=info) for info in infos))


async def folded(client: httpx.AsyncClient, peers: dict[str, list[int]], task: str = TASK) -> None:
    """Wait until the scheduler shows these holders of the task, each an active peer.

    Asking before that would be asking about an unknown task, which rightly requests a seed fetch.
    """

    async def shown() -> bool:
        response = await client.get(f"/api/v1/tasks/{task}")
        if response.status_code != 200 or response.json()["peers"] != peers:
            return False
        states = {p["peer_id"]: p["state"] for p in (await client.get("/api/v1/peers")).json()}
        return all(states.get(peer_id) == "active" for peer_id in peers)

    await eventually(shown)


def parents(reply: AssignmentReply) -> dict[int, list[str]]:
    return {piece.piece_number: [parent.peer_id for parent in piece.parents] for piece in reply.pieces}


async def assign_until(
    bus: Bus, message: AssignmentRequest, check: Callable[[AssignmentReply], bool], timeout: float = 10.0
) -> AssignmentReply:
    """Ask until the reply passes ``check`` (events reach the scheduler asynchronously)."""
    last: list[AssignmentReply] = []

    async def passes() -> bool:
        last[:] = [await bus.request(message, AssignmentReply)]
        return check(last[0])

    try:
        await eventually(passes, timeout)
    except AssertionError:
        raise AssertionError(f"last reply: {last[0] if last else None}") from None
    return last[0]


async def seed_jobs(bus: Bus) -> int:
    info = await bus.js.stream_info(SEED_JOBS_STREAM.name)
    return int(info.state.messages)


async def metric(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    text = (await client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def test_parents_are_ranked_by_the_evaluator_and_the_requester_never_gets_itself(
    tmp_path: Path, nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    bus = await connect_bus(bus_factory)
    # One parent is a real cache-store, registered by its own announcer.
    store_config = service_config(CacheStoreConfig, tmp_path / "store", nats_server.url, peer_id="near", idc="idc-1")
    store = create_cache_store(store_config)
    async with scheduler(tmp_path, nats_server.url) as app, running(store):
        client: httpx.AsyncClient = app.state.client
        await register(
            bus,
            peer("me", idc="idc-1", location="cn|hz|z1"),
            peer("far", idc="idc-2", location="us|ny"),
            peer("seed-0", is_seed=True, idc="idc-1", location="cn|hz|z1"),
        )
        await publish(
            bus,
            registered(),
            *(announced(n, "seed-0") for n in range(PIECES)),
            announced(0, "near", parent="seed-0", cost=40.0),
            announced(1, "near", parent="seed-0", cost=40.0),
            announced(0, "far", parent="seed-0", cost=40.0),
            announced(2, "me", parent="seed-0", cost=40.0),
        )
        await folded(client, {"far": [0], "me": [2], "near": [0, 1], "seed-0": [0, 1, 2]})

        def settled(reply: AssignmentReply) -> bool:
            return parents(reply) == {0: ["near", "seed-0", "far"], 1: ["near", "seed-0"]}

        # "me" lacks pieces 0 and 1. A normal peer in its IDC first; then the seed, which is in its
        # location too, before a normal peer on another continent.
        reply = await assign_until(bus, request("me"), settled)
        assert reply.status is TaskStatus.AVAILABLE and not reply.seed_requested and reply.retry_after_ms == 0
        assert (reply.content_length, reply.piece_size, reply.piece_count) == (CONTENT_LENGTH, PIECE_SIZE, PIECES)
        first = reply.pieces[0]
        assert (first.range_start, first.range_length, first.digest) == (0, PIECE_SIZE, piece_digest(0))
        scores = [parent.score for parent in first.parents]
        assert scores == sorted(scores, reverse=True)
        assert [parent.is_seed for parent in first.parents] == [False, True, False]
        assert first.parents[0].upload_url == store_config.upload_url  # As the real store registered it.

        # Asking for a piece it holds, it is offered the others only.
        reply = await bus.request(request("me", pieces_wanted=[2, 0]), AssignmentReply)
        assert parents(reply) == {0: ["near", "seed-0", "far"], 2: ["seed-0"]}
        # Nobody else is offered itself either.
        reply = await bus.request(request("near"), AssignmentReply)
        assert parents(reply) == {2: ["me", "seed-0"]}
        assert await seed_jobs(bus) == 0

        # The admin view: which peer holds which pieces.
        tasks = (await client.get("/api/v1/tasks")).json()
        assert [(t["task_id"], t["state"], t["pieces_held"], t["holders"]) for t in tasks] == [
            (TASK, "available", 3, 4)
        ]
        detail = (await client.get(f"/api/v1/tasks/{TASK}")).json()
        assert detail["peers"] == {"far": [0], "me": [2], "near": [0, 1], "seed-0": [0, 1, 2]}
        assert detail["back_to_source_count"] == 3 and detail["content_length"] == CONTENT_LENGTH
        assert [p["holders"] for p in detail["pieces"]] == [
            ["far", "near", "seed-0"],
            ["near", "seed-0"],
            ["me", "seed-0"],
        ]
        missing = await client.get(f"/api/v1/tasks/{OTHER_TASK}")
        assert missing.status_code == 404 and missing.json()["error"] == "task_not_found"

        assert await metric(client, "damselfly_scheduler_assignments_total", status="available") >= 3
        assert await metric(client, "damselfly_scheduler_assignment_seconds_count") >= 3
        assert await metric(client, "damselfly_scheduler_back_to_source_pieces_total") == 3
        assert await metric(client, "damselfly_scheduler_tasks", state="available") == 1


async def test_twenty_concurrent_requests_for_an_unknown_task_make_exactly_one_seed_job(
    tmp_path: Path, nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    bus = await connect_bus(bus_factory)
    options = {"seed_retry_backoff_seconds": 0.5}
    # Two replicas share the requests (queue group): one job between them, not one each.
    async with (
        scheduler(tmp_path, nats_server.url, "s1", **options) as first,
        scheduler(tmp_path, nats_server.url, "s2", **options) as second,
    ):
        peers = [f"peer-{i}" for i in range(20)]
        await register(bus, *(peer(peer_id) for peer_id in peers))

        async def burst() -> list[AssignmentReply]:
            return await asyncio.gather(
                *(
                    bus.request(
                        request(peer_id, content_length=CONTENT_LENGTH, authorization="Bearer t"), AssignmentReply
                    )
                    for peer_id in peers
                )
            )

        replies = await burst()
        assert await seed_jobs(bus) == 1
        assert sum(reply.seed_requested for reply in replies) == 1
        for reply in replies:
            assert reply.status is TaskStatus.UNKNOWN and reply.pieces == []
            assert 0 < reply.retry_after_ms <= 200
            assert (reply.content_length, reply.piece_size, reply.piece_count) == (CONTENT_LENGTH, PIECE_SIZE, PIECES)

        job_message = await bus.js.get_last_msg(SEED_JOBS_STREAM.name, SEED_FETCH_REQUESTED)
        job = SeedFetchRequested.model_validate_json(job_message.data or b"")
        assert job_message.headers and job_message.headers[MSG_ID_HEADER] == f"seed.fetch:{TASK}:0"
        assert (job.task_id, job.url, job.digest, job.attempt) == (TASK, URL, BLOB, 0)
        assert (job.content_length, job.piece_size, job.authorization) == (CONTENT_LENGTH, PIECE_SIZE, "Bearer t")
        assert job.requested_by in peers

        # While it is in flight, nobody asks again.
        await burst()
        assert await seed_jobs(bus) == 1

        # The attempt fails: peers are told so for a while, then exactly one job for attempt 1.
        await publish(bus, SeedFetchCompleted(task_id=TASK, seed_id="seed-0", attempt=0, ok=False, error="HTTP 503"))
        failed = await assign_until(bus, request("peer-0"), lambda r: r.status is TaskStatus.FAILED)
        assert failed.error and "HTTP 503" in failed.error and failed.retry_after_ms > 0
        assert await seed_jobs(bus) == 1

        async def retried() -> bool:
            await burst()
            return await seed_jobs(bus) > 1

        await eventually(retried)
        assert await seed_jobs(bus) == 2
        job = SeedFetchRequested.model_validate_json(
            (await bus.js.get_last_msg(SEED_JOBS_STREAM.name, SEED_FETCH_REQUESTED)).data or b""
        )
        assert job.attempt == 1
        await burst()
        assert await seed_jobs(bus) == 2

        published = sum(
            [
                await metric(app.state.client, "damselfly_scheduler_seed_fetches_total", outcome="published")
                for app in (first, second)
            ]
        )
        assert published == 2


async def test_a_restarted_scheduler_answers_from_jetstream_without_new_announcements(
    tmp_path: Path, nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    bus = await connect_bus(bus_factory)
    await register(bus, peer("me"), peer("a"), peer("b"), peer("liar"), peer("seed-0", is_seed=True))
    events: list[Event] = [
        announced(0, "a", parent="seed-0", cost=20.0),  # Before its task: out of order on purpose.
        registered(),
        *(announced(n, "seed-0") for n in range(PIECES)),
        announced(1, "b", parent="a", cost=30.0),
        announced(0, "liar", parent="seed-0", cost=20.0),
        announced(1, "liar", parent="seed-0", cost=20.0),
        PieceFailed(
            task_id=TASK, piece_number=0, parent_id="liar", reporter_id="b", reason=PieceFailureReason.DIGEST_MISMATCH
        ),
        SeedFetchCompleted(task_id=TASK, seed_id="seed-0", attempt=0, ok=True),
    ]
    expected = {0: ["a", "seed-0"], 1: ["b", "seed-0"], 2: ["seed-0"]}
    async with scheduler(tmp_path, nats_server.url, "s1") as app:
        await publish(bus, *events)
        await folded(app.state.client, {"a": [0], "b": [1], "seed-0": [0, 1, 2]})

        async def completion_folded() -> bool:
            return (await app.state.client.get(f"/api/v1/tasks/{TASK}")).json()["seed_attempts"] == 1

        await eventually(completion_folded)
        before = await assign_until(bus, request("me"), lambda r: parents(r) == expected)
        view_before = (await app.state.client.get(f"/api/v1/tasks/{TASK}")).json()

    # A new instance, nothing published since: it replays both streams before it answers.
    async with scheduler(tmp_path, nats_server.url, "s2") as app:
        after = await bus.request(request("me"), AssignmentReply)
        assert after == before
        assert (await app.state.client.get(f"/api/v1/tasks/{TASK}")).json() == view_before
        assert view_before["state"] == "available" and view_before["blocked_parents"] == ["liar"]
        assert view_before["seed_attempts"] == 1
    assert await seed_jobs(bus) == 0


async def test_answers_wait_for_the_replay_instead_of_asking_the_origin_again(
    tmp_path: Path, nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    bus = await connect_bus(bus_factory)
    await register(bus, peer("me"), peer("seed-0", is_seed=True))
    # Many events, so the replay is still running when the first request arrives.
    for task in range(60):
        task_id = task_id_for_digest("sha256:" + format(task, "x").rjust(64, "0"))
        await publish(bus, registered(task_id), *(announced(n, "seed-0", task=task_id) for n in range(PIECES)))
    await publish(bus, registered(), *(announced(n, "seed-0") for n in range(PIECES)))
    app = create_scheduler(service_config(SchedulerConfig, tmp_path / "s", nats_server.url))
    async with running(app):
        # The replay takes a while on a loaded machine; the answer must wait for it, so the client does too.
        reply = await bus.request(request("me"), AssignmentReply, timeout=20)
    assert reply.status is TaskStatus.AVAILABLE and parents(reply) == {n: ["seed-0"] for n in range(PIECES)}
    assert await seed_jobs(bus) == 0


async def test_a_parent_that_served_a_bad_piece_is_no_longer_offered_for_that_task(
    tmp_path: Path, nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    bus = await connect_bus(bus_factory)
    async with scheduler(tmp_path, nats_server.url) as app:
        await register(bus, peer("me"), peer("a"), peer("b"))
        await publish(
            bus,
            registered(),
            registered(OTHER_TASK),
            *(announced(n, holder) for n in range(PIECES) for holder in ("a", "b")),
            announced(0, "a", task=OTHER_TASK),
        )
        await folded(app.state.client, {"a": [0, 1, 2], "b": [0, 1, 2]})
        await folded(app.state.client, {"a": [0]}, task=OTHER_TASK)
        await assign_until(bus, request("me"), lambda r: all(p == ["a", "b"] for p in parents(r).values()))
        await publish(
            bus,
            PieceFailed(
                task_id=TASK, piece_number=1, parent_id="a", reporter_id="me", reason=PieceFailureReason.DIGEST_MISMATCH
            ),
        )
        reply = await assign_until(bus, request("me"), lambda r: parents(r) == {n: ["b"] for n in range(PIECES)})
        assert reply.status is TaskStatus.AVAILABLE and await seed_jobs(bus) == 0
        # Still trusted for the other task.
        other = await bus.request(request("me", task=OTHER_TASK, pieces_wanted=[0]), AssignmentReply)
        assert parents(other) == {0: ["a"]}

        # When the only holder is blocked the piece is gone: that takes the origin (one job).
        await publish(
            bus,
            PieceFailed(
                task_id=TASK, piece_number=2, parent_id="b", reporter_id="me", reason=PieceFailureReason.DIGEST_MISMATCH
            ),
        )
        reply = await assign_until(bus, request("me"), lambda r: r.pieces == [])
        assert reply.status is TaskStatus.UNKNOWN and reply.seed_requested and await seed_jobs(bus) == 1


async def test_slow_and_unreachable_parents_are_skipped(
    tmp_path: Path, nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    bus = await connect_bus(bus_factory)
    async with scheduler(tmp_path, nats_server.url) as app:
        # "slow" would rank first on locality; "ok" is in another IDC.
        await register(bus, peer("me", idc="x"), peer("slow", idc="x"), peer("ok", idc="y"), peer("flaky", idc="x"))
        await publish(bus, registered(), *(announced(0, holder) for holder in ("slow", "ok", "flaky")))
        await folded(app.state.client, {"flaky": [0], "ok": [0], "slow": [0]})
        await assign_until(bus, request("me", pieces_wanted=[0]), lambda r: parents(r) == {0: ["flaky", "slow", "ok"]})

        # Five steady downloads from "slow", then one far above its mean.
        history = [10.0, 12.0, 11.0, 9.0, 10.0, 900.0]
        await publish(
            bus, *(announced(1 + i % 2, f"child-{i}", parent="slow", cost=cost) for i, cost in enumerate(history))
        )
        # A connection failure benches "flaky" for the cooldown.
        await publish(
            bus,
            PieceFailed(
                task_id=TASK, piece_number=0, parent_id="flaky", reporter_id="me", reason=PieceFailureReason.CONNECTION
            ),
        )
        reply = await assign_until(bus, request("me", pieces_wanted=[0]), lambda r: parents(r) == {0: ["ok"]})
        assert reply.status is TaskStatus.AVAILABLE and await seed_jobs(bus) == 0

        # With nobody in good standing, the benched ones are still better than the origin.
        await publish(
            bus,
            PieceFailed(
                task_id=TASK,
                piece_number=0,
                parent_id="ok",
                reporter_id="me",
                reason=PieceFailureReason.DIGEST_MISMATCH,
            ),
        )
        reply = await assign_until(
            bus, request("me", pieces_wanted=[0]), lambda r: "ok" not in parents(r).get(0, ["ok"])
        )
        assert sorted(parents(reply)[0]) == ["flaky", "slow"] and await seed_jobs(bus) == 0
