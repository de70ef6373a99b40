"""The bus over a real nats-server: de-duplication, ack/nak/term mapping, trace context, request/reply."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from shared.bus import Bus, Delivery
from shared.errors import DependencyUnavailable, InvalidStateTransition, MalformedMessage, PeerNotFound
from shared.schemas import (
    AssignmentReply,
    AssignmentRequest,
    Event,
    PeerHeartbeat,
    PieceAnnounced,
    SeedFetchRequested,
    TaskStatus,
)
from shared.subjects import (
    PEERS_STREAM,
    SEED_FETCH_CONSUMER,
    SEED_JOBS_STREAM,
    TASKS_STREAM,
    ConsumerSpec,
)
from shared.telemetry import tracer

pytestmark = pytest.mark.integration

BusFactory = Callable[..., Awaitable[Bus]]
TASK = "ab" * 32
DIGEST = "sha256:" + "cd" * 32


def piece(number: int, holder: str = "peer-0") -> PieceAnnounced:
    return PieceAnnounced(
        task_id=TASK, piece_number=number, range_start=number * 4, range_length=4, digest=DIGEST, holder=holder
    )


def fast_consumer(**overrides: object) -> ConsumerSpec:
    values: dict[str, object] = {
        "stream": TASKS_STREAM,
        "filter_subjects": ("damselfly.v1.piece.>",),
        "durable": "test-pieces",
        "ack_wait_seconds": 2.0,
        "max_deliver": 3,
        "nak_delays_seconds": (0.05,),
    }
    values.update(overrides)
    return ConsumerSpec(**values)  # type: ignore[arg-type]


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_streams_are_declared_idempotently_with_their_limits(bus_factory: BusFactory) -> None:
    bus = await bus_factory()
    await bus.ensure_streams(PEERS_STREAM, TASKS_STREAM, SEED_JOBS_STREAM)
    await bus.ensure_streams(PEERS_STREAM, TASKS_STREAM, SEED_JOBS_STREAM)  # Again: no error, same config.
    peers = await bus.js.stream_info(PEERS_STREAM.name)
    assert peers.config.max_msgs_per_subject == 1
    jobs = await bus.js.stream_info(SEED_JOBS_STREAM.name)
    assert str(getattr(jobs.config.retention, "value", jobs.config.retention)) == "workqueue"
    assert jobs.config.duplicate_window == SEED_JOBS_STREAM.duplicate_window_seconds


async def test_publishing_the_same_fact_twice_stores_it_once(bus_factory: BusFactory) -> None:
    bus = await bus_factory()
    await bus.ensure_streams(TASKS_STREAM)
    first = await bus.publish(piece(0))
    again = await bus.publish(piece(0).model_copy(update={"cost_ms": 5.0}))
    assert not first.duplicate and again.duplicate
    info = await bus.js.stream_info(TASKS_STREAM.name)
    assert info.state.messages == 1


async def test_many_peers_requesting_one_seed_fetch_make_one_job(bus_factory: BusFactory) -> None:
    buses = [await bus_factory(f"peer-{i}") for i in range(4)]
    await buses[0].ensure_streams(SEED_JOBS_STREAM)
    jobs = [SeedFetchRequested(task_id=TASK, url="http://o/blob", requested_by=f"peer-{i}") for i in range(4)]
    await asyncio.gather(*(bus.publish(job) for bus, job in zip(buses, jobs, strict=True)))
    info = await buses[0].js.stream_info(SEED_JOBS_STREAM.name)
    assert info.state.messages == 1


async def test_a_message_published_by_one_service_is_consumed_by_another(bus_factory: BusFactory) -> None:
    publisher, consumer = await bus_factory("publisher"), await bus_factory("consumer")
    await publisher.ensure_streams(TASKS_STREAM)
    received: list[tuple[Event, Delivery]] = []

    async def handle(event: Event, delivery: Delivery) -> None:
        received.append((event, delivery))

    consumer.consume(fast_consumer(), handle)
    await publisher.publish(piece(3))
    await wait_until(lambda: len(received) == 1)
    event, delivery = received[0]
    assert event == piece(3)
    assert delivery.subject == f"damselfly.v1.piece.announced.{TASK}" and delivery.num_delivered == 1


async def test_consumer_span_is_a_child_of_the_publisher_span(
    bus_factory: BusFactory, span_exporter: InMemorySpanExporter
) -> None:
    publisher, consumer = await bus_factory("publisher"), await bus_factory("consumer")
    await publisher.ensure_streams(TASKS_STREAM)
    done = asyncio.Event()

    async def handle(event: Event, delivery: Delivery) -> None:
        with tracer().start_as_current_span("apply piece"):
            done.set()

    consumer.consume(fast_consumer(), handle)
    with tracer().start_as_current_span("announce"):
        await publisher.publish(piece(1))
    await asyncio.wait_for(done.wait(), 5)
    await wait_until(lambda: any(s.name.startswith("process") for s in span_exporter.get_finished_spans()))
    spans = {span.name: span for span in span_exporter.get_finished_spans()}
    publish, process = spans["publish piece.announced"], spans["process piece.announced/1"]
    assert publish.kind is SpanKind.PRODUCER and process.kind is SpanKind.CONSUMER
    assert process.context.trace_id == publish.context.trace_id == spans["announce"].context.trace_id
    assert process.parent is not None and process.parent.span_id == publish.context.span_id
    assert spans["apply piece"].parent.span_id == process.context.span_id


async def test_transient_failure_is_redelivered_then_acked(bus_factory: BusFactory) -> None:
    bus = await bus_factory()
    await bus.ensure_streams(TASKS_STREAM)
    deliveries: list[int] = []

    async def flaky(event: Event, delivery: Delivery) -> None:
        deliveries.append(delivery.num_delivered)
        if delivery.num_delivered < 3:
            raise DependencyUnavailable("origin away")

    bus.consume(fast_consumer(max_deliver=5), flaky)
    await bus.publish(piece(0))
    await wait_until(lambda: len(deliveries) == 3)
    await asyncio.sleep(0.5)
    assert deliveries == [1, 2, 3]
    info = await bus.js.consumer_info(TASKS_STREAM.name, "test-pieces")
    assert info.num_ack_pending == 0 and info.num_pending == 0


@pytest.mark.parametrize(
    "failure", [MalformedMessage("bad"), InvalidStateTransition("peer", "left", "heartbeat"), PeerNotFound("x")]
)
async def test_permanent_failure_is_terminated_not_redelivered(bus_factory: BusFactory, failure: Exception) -> None:
    bus = await bus_factory()
    await bus.ensure_streams(TASKS_STREAM)
    deliveries: list[int] = []

    async def hopeless(event: Event, delivery: Delivery) -> None:
        deliveries.append(delivery.num_delivered)
        raise failure

    bus.consume(fast_consumer(), hopeless)
    await bus.publish(piece(0))
    await wait_until(lambda: len(deliveries) == 1)
    await asyncio.sleep(2.5)  # Past ack_wait: a message that was not terminated would come back.
    assert deliveries == [1]


async def test_a_malformed_payload_never_reaches_the_handler_and_is_terminated(bus_factory: BusFactory) -> None:
    bus = await bus_factory()
    await bus.ensure_streams(TASKS_STREAM)
    seen: list[Event] = []

    async def handle(event: Event, delivery: Delivery) -> None:
        seen.append(event)

    bus.consume(fast_consumer(), handle)
    await bus.js.publish(f"damselfly.v1.piece.announced.{TASK}", b"{not json")
    await bus.publish(piece(5))
    await wait_until(lambda: len(seen) == 1)
    await asyncio.sleep(2.5)
    assert seen == [piece(5)]
    info = await bus.js.consumer_info(TASKS_STREAM.name, "test-pieces")
    assert info.num_ack_pending == 0 and info.num_redelivered == 0


async def test_a_durable_work_queue_hands_each_job_to_one_worker_and_confirms_acks(bus_factory: BusFactory) -> None:
    worker_a, worker_b = await bus_factory("a"), await bus_factory("b")
    await worker_a.ensure_streams(SEED_JOBS_STREAM)
    taken: list[tuple[str, str]] = []

    def worker(name: str) -> Callable[[Event, Delivery], Awaitable[None]]:
        async def take(event: Event, delivery: Delivery) -> None:
            assert isinstance(event, SeedFetchRequested)
            taken.append((name, event.task_id))

        return take

    worker_a.consume(SEED_FETCH_CONSUMER, worker("a"))
    worker_b.consume(SEED_FETCH_CONSUMER, worker("b"))
    tasks = [f"{i:064x}" for i in range(10)]
    for task in tasks:
        await worker_a.publish(SeedFetchRequested(task_id=task, url="http://o", requested_by="p"))
    await wait_until(lambda: len(taken) == 10)
    assert sorted(task for _, task in taken) == tasks
    await wait_until(lambda: True)
    info = await worker_a.js.stream_info(SEED_JOBS_STREAM.name)
    assert info.state.messages == 0  # Acked jobs leave a work queue.


async def test_request_reply_carries_schemas_and_errors(bus_factory: BusFactory) -> None:
    scheduler, peer = await bus_factory("scheduler"), await bus_factory("peer")

    async def assign(request: AssignmentRequest) -> AssignmentReply:
        if request.peer_id == "ghost":
            raise PeerNotFound("no peer 'ghost'")
        return AssignmentReply(task_id=request.task_id, status=TaskStatus.UNKNOWN, seed_requested=True)

    await scheduler.serve("damselfly.v1.scheduler.assign", AssignmentRequest, assign, queue="schedulers")
    reply = await peer.request(AssignmentRequest(task_id=TASK, peer_id="peer-0", url="u"), AssignmentReply)
    assert reply.status is TaskStatus.UNKNOWN and reply.seed_requested
    with pytest.raises(PeerNotFound, match="ghost"):
        await peer.request(AssignmentRequest(task_id=TASK, peer_id="ghost", url="u"), AssignmentReply)


async def test_request_reaches_a_responder_that_arrives_moments_later(bus_factory: BusFactory) -> None:
    scheduler, peer = await bus_factory("scheduler"), await bus_factory("peer")

    async def assign(request: AssignmentRequest) -> AssignmentReply:
        return AssignmentReply(task_id=request.task_id, status=TaskStatus.UNKNOWN)

    async def serve_later() -> None:
        await asyncio.sleep(0.1)
        await scheduler.serve("damselfly.v1.scheduler.assign", AssignmentRequest, assign, queue="schedulers")

    late = asyncio.create_task(serve_later())
    reply = await peer.request(AssignmentRequest(task_id=TASK, peer_id="peer-0", url="u"), AssignmentReply)
    await late
    assert reply.task_id == TASK


async def test_request_without_responder_is_dependency_unavailable(bus_factory: BusFactory) -> None:
    peer = await bus_factory()
    with pytest.raises(DependencyUnavailable):
        await peer.request(AssignmentRequest(task_id=TASK, peer_id="p", url="u"), AssignmentReply, timeout=0.5)


async def test_unreachable_nats_fails_fast_with_the_url(nats_settings: object) -> None:
    from shared.config import NatsSettings

    settings = NatsSettings(url="nats://127.0.0.1:1", connect_timeout=1.0)
    bus = Bus(settings, client_name="t")
    started = asyncio.get_running_loop().time()
    with pytest.raises(DependencyUnavailable, match=r"nats://127\.0\.0\.1:1"):
        await bus.connect()
    assert asyncio.get_running_loop().time() - started < 10


async def test_publish_without_stream_is_dependency_unavailable(bus_factory: BusFactory) -> None:
    bus = await bus_factory()
    with pytest.raises(DependencyUnavailable):
        await bus.publish(PeerHeartbeat(peer_id="p", sequence=1))
