"""A TCP forwarder that slows one server down, so a test can act while a transfer is under way."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from shared.netutil import free_port


@asynccontextmanager
async def throttled(target_port: int, bytes_per_second: int) -> AsyncIterator[int]:
    """Listen on a free port and forward to ``target_port``, server-to-client bytes at the given rate."""
    port = free_port()
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: int | None) -> None:
        try:
            while chunk := await reader.read(64 * 1024):
                writer.write(chunk)
                await writer.drain()
                if rate:
                    await asyncio.sleep(len(chunk) / rate)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_writer.close()
            return
        for coroutine in (
            pipe(client_reader, server_writer, None),
            pipe(server_reader, client_writer, bytes_per_second),
        ):
            task = asyncio.create_task(coroutine)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    try:
        yield port
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await server.wait_closed()
