"""A thin layer over nats-py JetStream: explicit streams, pull consumers, de-duplicated publishes.

What it adds to nats-py, and nothing more:

* every publish carries ``Nats-Msg-Id`` (the event's own id, so the same fact published twice is kept
  once), the event's schema tag and the W3C ``traceparent`` of the current span;
* streams and consumers are declared idempotently, again after every reconnect (a NATS server that
  lost its store comes back empty);
* a consumer loop that decodes each message into its schema, restores the publisher's trace context,
  and turns the handler's outcome into ack / nak-with-delay / term through :mod:`shared.errors`;
* request/reply with the same schemas and tracing, for the scheduler's assignment service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared.config import NatsSettings
from shared.errors import (
    BusDisposition,
    DamselflyError,
    DependencyUnavailable,
    MalformedMessage,
    bus_disposition_of,
)
from shared.metrics import BusMetrics
from shared.schemas.events import Event, event_type_for
from shared.subjects import ConsumerSpec, DeliverFrom, Retention, StreamSpec
from shared.telemetry import extract_trace_context, inject_trace_headers, tracer

logger = logging.getLogger(__name__)

EVENT_HEADER = "Damselfly-Event"
MSG_ID_HEADER = "Nats-Msg-Id"
ERROR_HEADER = "Damselfly-Error"

E = TypeVar("E", bound=Event)
R = TypeVar("R", bound=Event)


@dataclass(frozen=True)
class Delivery:
    """What a handler may want to know about the message besides its event."""

    subject: str
    num_delivered: int
    stream_sequence: int


Handler = Callable[[Event, Delivery], Awaitable[None]]
Responder = Callable[[Any], Awaitable[Event]]

_RETENTION = {
    Retention.LIMITS: api.RetentionPolicy.LIMITS,
    Retention.WORK_QUEUE: api.RetentionPolicy.WORK_QUEUE,
}
_DELIVER = {
    DeliverFrom.ALL: api.DeliverPolicy.ALL,
    DeliverFrom.NEW: api.DeliverPolicy.NEW,
    DeliverFrom.LAST_PER_SUBJECT: api.DeliverPolicy.LAST_PER_SUBJECT,
}
# How long a request keeps retrying "no responders" before it reports the service absent (seconds).
NO_RESPONDER_RETRY_BUDGET = 0.6
# Errors that mean "NATS is not reachable right now": wait and try again, never crash a loop.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.NoServersError,
    nats.errors.TimeoutError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
    asyncio.TimeoutError,
    OSError,
)
# Connection trouble, or a JetStream API error while the server is still recovering its streams.
_RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (*_CONNECTION_ERRORS, nats.js.errors.APIError)
# A publish whose subject no stream takes (streams not declared yet, or lost with the server's store).
_PUBLISH_ERRORS: tuple[type[BaseException], ...] = (*_CONNECTION_ERRORS, nats.js.errors.NoStreamResponseError)


def _nak_delay(spec: ConsumerSpec, num_delivered: int) -> float:
    delays = spec.nak_delays_seconds
    return delays[min(max(num_delivered, 1), len(delays)) - 1]


class Bus:
    """One NATS connection of one service, with its JetStream context."""

    def __init__(self, settings: NatsSettings, client_name: str, metrics: BusMetrics | None = None) -> None:
        self.settings = settings
        self.client_name = client_name
        self.metrics = metrics
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._streams: dict[str, StreamSpec] = {}
        self._consumers: list[ConsumerSpec] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._subscriptions: list[Subscription] = []
        self._closing = False
        self._declared = asyncio.Event()

    # --- connection ------------------------------------------------------------------------------

    async def connect(self, initial_attempts: int = 3) -> None:
        """Connect, failing with DependencyUnavailable after a bounded first try; reconnect forever after."""
        try:
            self._nc = await nats.connect(
                servers=self.settings.servers,
                name=self.client_name,
                connect_timeout=max(1, round(self.settings.connect_timeout)),
                reconnect_time_wait=0.5,
                max_reconnect_attempts=initial_attempts,
                ping_interval=5,
                max_outstanding_pings=2,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
                error_cb=self._on_error,
            )
        except (TimeoutError, nats.errors.NoServersError, OSError) as exc:
            raise DependencyUnavailable(
                f"cannot connect to NATS at {self.settings.url}: {exc or type(exc).__name__}",
                url=self.settings.url,
            ) from exc
        # Once up, a service rides out any NATS outage; readiness reports it meanwhile.
        self._nc.options["max_reconnect_attempts"] = -1
        self._js = self._nc.jetstream(timeout=self.settings.request_timeout)
        if self.metrics:
            self.metrics.connected.set(1)
        logger.info("connected to NATS", extra={"url": self.settings.url})

    @property
    def is_connected(self) -> bool:
        """True while the NATS connection is up."""
        return self._nc is not None and self._nc.is_connected

    @property
    def nc(self) -> NatsClient:
        """The underlying nats-py client (for KV and object stores)."""
        if self._nc is None:
            raise DependencyUnavailable("the bus is not connected")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context."""
        if self._js is None:
            raise DependencyUnavailable("the bus is not connected")
        return self._js

    async def _on_disconnected(self) -> None:
        if self.metrics:
            self.metrics.connected.set(0)
        if not self._closing:
            logger.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        if self.metrics:
            self.metrics.connected.set(1)
            self.metrics.reconnects.inc()
        logger.info("reconnected to NATS", extra={"url": self.settings.url})
        # The server may have come back without its store: declare everything again, off the callback.
        self._tasks.append(asyncio.create_task(self._redeclare(), name="bus-redeclare"))

    async def _on_error(self, exc: Exception) -> None:
        logger.debug("NATS client error: %s", exc)

    async def _redeclare(self) -> None:
        for attempt in range(20):
            try:
                for spec in list(self._streams.values()):
                    await self._declare_stream(spec)
                for consumer in list(self._consumers):
                    if consumer.durable:
                        await self._declare_consumer(consumer)
                return
            except _RETRYABLE_ERRORS as exc:
                logger.info("re-declaring streams failed (%s); retrying", exc)
                await asyncio.sleep(min(0.2 * (attempt + 1), 2.0))

    async def close(self) -> None:
        """Stop every consumer and responder, then drain and close the connection."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        self._subscriptions.clear()
        if self._nc is not None and not self._nc.is_closed:
            # Consumers are stopped and unacked messages return to the stream after ack_wait, so a
            # plain close loses nothing; flush first so the last publishes' acks are not dropped.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.flush(), timeout=1)
            with contextlib.suppress(Exception):
                await self._nc.close()
        if self.metrics:
            self.metrics.connected.set(0)

    # --- streams and consumers -------------------------------------------------------------------

    def _stream_config(self, spec: StreamSpec) -> api.StreamConfig:
        is_work_queue = spec.retention is Retention.WORK_QUEUE
        return api.StreamConfig(
            name=spec.name,
            description=spec.description,
            subjects=list(spec.subjects),
            retention=_RETENTION[spec.retention],
            storage=api.StorageType.FILE,
            num_replicas=self.settings.replicas,
            # Work queues drain as jobs are acked; only event history ages out.
            max_age=None if is_work_queue else self.settings.stream_max_age_seconds,
            max_bytes=self.settings.stream_max_bytes,
            max_msgs_per_subject=spec.max_msgs_per_subject,
            duplicate_window=spec.duplicate_window_seconds,
            discard=api.DiscardPolicy.OLD,
        )

    async def _declare_stream(self, spec: StreamSpec) -> None:
        config = self._stream_config(spec)
        try:
            await self.js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            # 10058: the stream exists with another config: bring it to ours (limits may have changed).
            if exc.err_code != 10058:
                raise
            await self.js.update_stream(config)

    async def ensure_streams(self, *specs: StreamSpec) -> None:
        """Create or update the streams; remembered and re-declared after every reconnect."""
        for spec in specs:
            await self._declare_stream(spec)
            self._streams[spec.name] = spec

    def _consumer_config(self, spec: ConsumerSpec) -> api.ConsumerConfig:
        filters = list(spec.filter_subjects)
        return api.ConsumerConfig(
            durable_name=spec.durable,
            name=spec.durable,
            description=spec.description or None,
            deliver_policy=_DELIVER[spec.deliver_from],
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=spec.ack_wait_seconds,
            max_deliver=spec.max_deliver,
            max_ack_pending=spec.max_ack_pending,
            filter_subject=filters[0] if len(filters) == 1 else None,
            filter_subjects=filters if len(filters) > 1 else None,
            # Ephemeral consumers vanish a while after their process does.
            inactive_threshold=None if spec.durable else 60.0,
        )

    async def _declare_consumer(self, spec: ConsumerSpec) -> str:
        info = await self.js.add_consumer(spec.stream.name, self._consumer_config(spec))
        return str(info.name)

    # --- publishing ------------------------------------------------------------------------------

    async def publish(self, event: Event) -> api.PubAck:
        """Publish ``event`` to JetStream and wait for the server to store it (or drop it as duplicate)."""
        subject = event.subject()
        headers = {MSG_ID_HEADER: event.msg_id(), EVENT_HEADER: event.schema_tag()}
        with tracer().start_as_current_span(f"publish {event.name}", kind=SpanKind.PRODUCER) as span:
            span.set_attribute("messaging.system", "nats")
            span.set_attribute("messaging.destination.name", subject)
            span.set_attribute("messaging.message.id", headers[MSG_ID_HEADER])
            inject_trace_headers(headers)
            try:
                ack = await self.js.publish(subject, event.to_bytes(), headers=headers)
            except _PUBLISH_ERRORS as exc:
                if self.metrics:
                    self.metrics.publish_errors.labels(subject=event.subject_base).inc()
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                raise DependencyUnavailable(f"cannot publish {event.name}: NATS unavailable ({exc!r})") from exc
            span.set_attribute("messaging.nats.duplicate", bool(ack.duplicate))
        if self.metrics:
            self.metrics.published.labels(subject=event.subject_base).inc()
        return ack

    async def notify(self, event: Event) -> None:
        """Send ``event`` on core NATS, not stored: for hints whose loss costs time, never correctness."""
        headers = {EVENT_HEADER: event.schema_tag()}
        inject_trace_headers(headers)
        try:
            await self.nc.publish(event.subject(), event.to_bytes(), headers=headers)
        except _CONNECTION_ERRORS as exc:
            logger.debug("dropped %s: %r", event.name, exc)

    async def listen(self, subject: str, event_type: type[E], handler: Callable[[E], Awaitable[None]]) -> Subscription:
        """Call ``handler`` with each ``event_type`` message on ``subject`` (core NATS); malformed ones are dropped."""

        async def on_message(message: Msg) -> None:
            try:
                event = event_type.from_bytes(message.data)
            except MalformedMessage as exc:
                logger.warning("dropped a malformed %s: %s", event_type.name, exc)
                return
            assert isinstance(event, event_type)
            await handler(event)

        return await self.nc.subscribe(subject, cb=on_message)

    # --- consuming -------------------------------------------------------------------------------

    def consume(self, spec: ConsumerSpec, handler: Handler, *, name: str | None = None) -> None:
        """Run ``handler`` on every message of the consumer ``spec``, in a background task."""
        if spec.durable:
            self._consumers.append(spec)
        task_name = name or spec.durable or f"consumer-{spec.stream.name}"
        self._tasks.append(asyncio.create_task(self._consume_loop(spec, handler, task_name), name=task_name))

    async def declare_consumer(self, spec: ConsumerSpec) -> None:
        """Declare a durable consumer now (consume() also does, in its loop)."""
        await self._declare_consumer(spec)
        if spec.durable and spec not in self._consumers:
            self._consumers.append(spec)

    async def _consume_loop(self, spec: ConsumerSpec, handler: Handler, label: str) -> None:
        subscription: JetStreamContext.PullSubscription | None = None
        backoff = 0.1
        # With concurrency > 1 each message is handled in a task of its own, at most that many at once;
        # a message is only fetched when a slot is free, so the server redelivers nothing we sit on.
        slots = asyncio.Semaphore(spec.concurrency)
        handling: set[asyncio.Task[None]] = set()

        async def handle(message: Msg) -> None:
            try:
                await self._deliver(spec, handler, label, message)
            finally:
                slots.release()

        try:
            while not self._closing:
                try:
                    if subscription is None:
                        consumer_name = await self._declare_consumer(spec)
                        subscription = await self.js.pull_subscribe_bind(
                            durable=spec.durable, stream=spec.stream.name, name=consumer_name
                        )
                    if spec.concurrency == 1:
                        try:
                            messages = await subscription.fetch(spec.batch, timeout=1.0)
                        except nats.errors.TimeoutError:
                            continue
                        backoff = 0.1
                        for message in messages:
                            await self._deliver(spec, handler, label, message)
                        continue
                    await slots.acquire()
                    try:
                        [message] = await subscription.fetch(1, timeout=1.0)
                    except BaseException:
                        slots.release()
                        raise
                    backoff = 0.1
                    task = asyncio.create_task(handle(message), name=f"{label}-message")
                    handling.add(task)
                    task.add_done_callback(handling.discard)
                except nats.errors.TimeoutError:
                    continue
                except asyncio.CancelledError:
                    raise
                except nats.js.errors.NotFoundError:
                    # The consumer is gone (server lost its store, or an ephemeral one expired): recreate.
                    await self._drop_subscription(subscription)
                    subscription = None
                except _RETRYABLE_ERRORS as exc:
                    logger.debug("consumer %s waiting for NATS: %r", label, exc)
                    if not self.is_connected:
                        await self._drop_subscription(subscription)
                        subscription = None
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
        finally:
            for task in list(handling):
                task.cancel()
            await asyncio.gather(*handling, return_exceptions=True)

    async def _drop_subscription(self, subscription: JetStreamContext.PullSubscription | None) -> None:
        if subscription is not None:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _deliver(self, spec: ConsumerSpec, handler: Handler, label: str, message: Msg) -> None:
        metadata = message.metadata
        delivery = Delivery(
            subject=message.subject,
            num_delivered=metadata.num_delivered or 1,
            stream_sequence=metadata.sequence.stream if metadata.sequence else 0,
        )
        headers = message.headers or {}
        parent = extract_trace_context(headers)
        started = time.perf_counter()
        with tracer().start_as_current_span(
            f"process {headers.get(EVENT_HEADER, message.subject)}", context=parent, kind=SpanKind.CONSUMER
        ) as span:
            span.set_attribute("messaging.system", "nats")
            span.set_attribute("messaging.destination.name", message.subject)
            span.set_attribute("messaging.consumer.group.name", label)
            try:
                event_type = event_type_for(headers.get(EVENT_HEADER), message.subject)
                event = event_type.from_bytes(message.data)
                keepalive = asyncio.create_task(self._keep_in_progress(message, spec.ack_wait_seconds))
                try:
                    await handler(event, delivery)
                finally:
                    keepalive.cancel()
                disposition = BusDisposition.ACK
            except asyncio.CancelledError:
                # Shutting down mid-message: let it be redelivered to whoever runs next.
                with contextlib.suppress(Exception):
                    await message.nak()
                raise
            except Exception as exc:
                disposition = bus_disposition_of(exc)
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                log = logger.warning if isinstance(exc, DamselflyError) else logger.exception
                log(
                    "handler failed: %s",
                    exc,
                    extra={"consumer": label, "subject": message.subject, "disposition": disposition.value},
                )
            await self._settle(spec, message, disposition, delivery.num_delivered)
        if self.metrics:
            self.metrics.delivered.labels(consumer=label, outcome=disposition.value).inc()
            self.metrics.handler_seconds.labels(consumer=label).observe(time.perf_counter() - started)

    @staticmethod
    async def _keep_in_progress(message: Msg, ack_wait: float) -> None:
        """Tell the server a long handler is still working, so it does not redeliver meanwhile.

        If this process dies the reminders stop, and the message is redelivered after ``ack_wait``.
        """
        while True:
            await asyncio.sleep(max(ack_wait / 3, 0.1))
            with contextlib.suppress(*_CONNECTION_ERRORS):
                await message.in_progress()

    async def _settle(self, spec: ConsumerSpec, message: Msg, disposition: BusDisposition, delivered: int) -> None:
        try:
            if disposition is BusDisposition.ACK:
                if spec.confirm_ack:
                    await message.ack_sync(timeout=self.settings.request_timeout)
                else:
                    await message.ack()
            elif disposition is BusDisposition.NAK:
                await message.nak(delay=_nak_delay(spec, delivered))
            else:
                await message.term()
        except _CONNECTION_ERRORS as exc:
            # The server will redeliver after ack_wait; the handlers are idempotent for that reason.
            logger.warning("could not settle message on %s: %r", message.subject, exc)

    # --- request / reply -------------------------------------------------------------------------

    async def request(self, request: Event, reply_type: type[R], timeout: float | None = None) -> R:
        """Send ``request`` over core NATS and parse the reply as ``reply_type``.

        "No responders" is retried a few times within the timeout: the server can answer it for a
        subscription another connection made (and flushed) a moment ago (nats-server#2876), and a
        responder restarting is gone for a moment too. A service that is really absent still fails
        within ``NO_RESPONDER_RETRY_BUDGET`` seconds, so callers fall back quickly.
        """
        headers = {EVENT_HEADER: request.schema_tag()}
        budget = timeout or self.settings.request_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        give_up_no_responders = loop.time() + min(budget, NO_RESPONDER_RETRY_BUDGET)
        with tracer().start_as_current_span(f"request {request.name}", kind=SpanKind.CLIENT) as span:
            span.set_attribute("messaging.destination.name", request.subject())
            inject_trace_headers(headers)
            delay = 0.02
            while True:
                try:
                    reply = await self.nc.request(
                        request.subject(),
                        request.to_bytes(),
                        timeout=max(deadline - loop.time(), 0.01),
                        headers=headers,
                    )
                    break
                except nats.errors.NoRespondersError as exc:
                    if loop.time() + delay >= give_up_no_responders:
                        raise DependencyUnavailable(f"nobody serves {request.subject()}") from exc
                    span.add_event("no responders, retrying", {"delay_seconds": delay})
                    await asyncio.sleep(delay)
                    delay *= 2
                except _CONNECTION_ERRORS as exc:
                    raise DependencyUnavailable(f"{request.name} failed: {exc!r}") from exc
            error = (reply.headers or {}).get(ERROR_HEADER)
            if error:
                raise _error_from_reply(error, reply.data)
            parsed = reply_type.from_bytes(reply.data)
            assert isinstance(parsed, reply_type)
            return parsed

    async def serve(
        self, subject: str, request_type: type[E], responder: Callable[[E], Awaitable[Event]], queue: str
    ) -> None:
        """Answer requests on ``subject`` (queue group ``queue``, so replicas share the load)."""

        async def on_request(message: Msg) -> None:
            parent = extract_trace_context(message.headers)
            with tracer().start_as_current_span(
                f"serve {request_type.name}", context=parent, kind=SpanKind.SERVER
            ) as span:
                try:
                    request = request_type.from_bytes(message.data)
                    assert isinstance(request, request_type)
                    reply = await responder(request)
                    await message.respond(reply.to_bytes())
                except Exception as exc:
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, str(exc)))
                    error = exc if isinstance(exc, DamselflyError) else DamselflyError(f"internal error: {exc!r}")
                    if not isinstance(exc, DamselflyError):
                        logger.exception("responder for %s failed", subject)
                    with contextlib.suppress(Exception):
                        await self.nc.publish(
                            message.reply,
                            error.message.encode(),
                            headers={ERROR_HEADER: error.code},
                        )

        self._subscriptions.append(await self.nc.subscribe(subject, queue=queue, cb=on_request))
        # Make sure the server has the subscription before anyone is told this service is ready.
        await self.nc.flush()


def _error_from_reply(code: str, body: bytes) -> DamselflyError:
    """Rebuild the responder's error class from its code, so callers can catch the same types."""
    from shared import errors as error_module

    text = body.decode(errors="replace")
    for value in vars(error_module).values():
        if (
            isinstance(value, type)
            and issubclass(value, DamselflyError)
            and value.code == code
            and value.__init__ is DamselflyError.__init__
        ):
            return value(text)
    if code == MalformedMessage.code:
        return MalformedMessage(text)
    return DamselflyError(f"{code}: {text}")
