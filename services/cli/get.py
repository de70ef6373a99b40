"""``damselfly get URL -O FILE``: download any URL through the local node's P2P network, like dfget."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from shared.errors import DamselflyError, DependencyUnavailable, UpstreamError


@dataclass(frozen=True)
class GetResult:
    """What a download did."""

    url: str
    output: str
    bytes: int
    seconds: float
    task_id: str | None


async def download(
    url: str, output: Path, node: str, show_progress: bool, authorization: str | None = None
) -> GetResult:
    """Stream ``url`` through ``node``'s registry-proxy into ``output`` (written whole or not at all)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".damselfly-partial")
    started = time.monotonic()
    written = 0
    headers = {"Authorization": authorization} if authorization else {}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)) as session,
            session.get(f"{node.rstrip('/')}/api/v1/get", params={"url": url}, headers=headers) as response,
        ):
            if response.status != 200:
                body = await response.text()
                raise UpstreamError(f"{node} answered {response.status}: {body[:500]}")
            total = int(response.headers.get("Content-Length", "0"))
            task_id = response.headers.get("Damselfly-Task-Id")
            columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn())
            with Progress(*columns, disable=not show_progress, transient=True) as progress, partial.open("wb") as sink:
                bar = progress.add_task("download", total=total)
                async for chunk in response.content.iter_chunked(1024 * 1024):
                    sink.write(chunk)
                    written += len(chunk)
                    progress.update(bar, advance=len(chunk))
            if written != total:
                raise UpstreamError(f"got {written} of {total} bytes from {node}")
    except aiohttp.ClientError as exc:
        partial.unlink(missing_ok=True)
        raise DependencyUnavailable(f"cannot download through {node}: {exc}") from exc
    except DamselflyError:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(output)
    return GetResult(url=url, output=str(output), bytes=written, seconds=time.monotonic() - started, task_id=task_id)
