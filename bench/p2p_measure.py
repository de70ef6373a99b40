"""Measurements of the P2P benchmark: concurrent blob pulls, curl timings and CPU time per process."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import resource
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp

_READ_CHUNK = 1024 * 1024
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class PullResult:
    """One client's GET of the whole blob."""

    client: str
    url: str
    status: int
    bytes: int
    sha256_ok: bool
    first_byte_seconds: float | None
    seconds: float
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, times rounded to milliseconds."""
        doc = asdict(self)
        doc["seconds"] = round(self.seconds, 3)
        if self.first_byte_seconds is not None:
            doc["first_byte_seconds"] = round(self.first_byte_seconds, 3)
        return doc


async def pull(session: aiohttp.ClientSession, client: str, url: str, digest: str, started: float) -> PullResult:
    """GET ``url`` to the end, hashing as it arrives; times are from ``started`` (perf_counter)."""
    hasher = hashlib.sha256()
    received = 0
    first_byte: float | None = None
    status = 0
    error = None
    try:
        async with session.get(url) as response:
            status = response.status
            async for chunk in response.content.iter_chunked(_READ_CHUNK):
                if first_byte is None:
                    first_byte = time.perf_counter() - started
                hasher.update(chunk)
                received += len(chunk)
    except (aiohttp.ClientError, TimeoutError) as exc:
        error = repr(exc)[:500]
    finished = time.perf_counter() - started
    ok = status == 200 and error is None and "sha256:" + hasher.hexdigest() == digest
    return PullResult(client, url, status, received, ok, first_byte, finished, error)


async def pull_all(
    targets: Mapping[str, str], digest: str, started: float | None = None
) -> tuple[list[PullResult], float]:
    """GET the blob from every ``client -> url`` at once; results and wall time, from ``started`` (perf_counter)."""
    # One connection per client, no overall timeout (a shaped 8-way pull-through takes minutes), but a
    # read that stalls for minutes is a failure, not a result.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=600)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False) as session:
        started = time.perf_counter() if started is None else started
        results = await asyncio.gather(
            *(pull(session, client, url, digest, started) for client, url in targets.items())
        )
        return list(results), time.perf_counter() - started


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def curl_time(url: str) -> dict[str, Any]:
    """One ``curl -s -o /dev/null`` of ``url``: curl's own timings, bytes, status and CPU time."""
    # Reaped children's CPU time grows only by curl's here: the cluster's children are alive throughout.
    cpu_before = _children_cpu_seconds()
    process = await asyncio.create_subprocess_exec(
        "curl", "-s", "-o", "/dev/null", "-w", "%{json}", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"curl {url} failed ({process.returncode}): {err.decode(errors='replace')[:500]}")
    client_cpu = _children_cpu_seconds() - cpu_before
    report = json.loads(out)
    seconds = float(report["time_total"])
    size = int(report["size_download"])
    return {
        "seconds": round(seconds, 4),
        "bytes": size,
        "status": int(report["http_code"]),
        "first_byte_seconds": round(float(report["time_starttransfer"]), 4),
        "gb_per_second": round(size / seconds / 1e9, 3) if seconds else 0.0,
        "client_cpu_seconds": round(client_cpu, 3),
    }


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    # Fields after "(comm) ": state is index 0, so utime (field 14) is 11 and stime (field 15) is 12.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def machine_cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat (idle and iowait count as not busy)."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])  # guest time is already inside user time
    return float(total - idle), float(total)


_PEER_PREFIX = re.compile(r"^peer-\d+-")


def role_of(name: str) -> str:
    """Group processes by role: ``peer-3-registry-proxy`` -> ``peer registry-proxy``."""
    return _PEER_PREFIX.sub("peer ", name)


class CpuMeter:
    """CPU seconds per role and machine-wide busy share over one measured interval."""

    def __init__(self, pids: Mapping[str, int | None]) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid}
        self._start: dict[str, float | None] = {}
        self._machine: tuple[float, float] = (0.0, 0.0)
        self._wall = 0.0

    def start(self) -> None:
        """Take the first sample."""
        self._start = {name: process_cpu_seconds(pid) for name, pid in self.pids.items()}
        self._machine = machine_cpu_times()
        self._wall = time.perf_counter()

    def stop(self) -> dict[str, Any]:
        """CPU seconds used since :meth:`start`, per role, and how busy the machine's CPUs were."""
        by_role: dict[str, float] = {}
        for name, pid in self.pids.items():
            before, after = self._start.get(name), process_cpu_seconds(pid)
            if before is None or after is None:
                continue
            by_role[role_of(name)] = by_role.get(role_of(name), 0.0) + after - before
        busy, total = machine_cpu_times()
        busy_share = (busy - self._machine[0]) / max(total - self._machine[1], 1.0)
        wall = time.perf_counter() - self._wall
        return {
            "wall_seconds": round(wall, 3),
            "machine_busy_percent": round(100 * busy_share, 1),
            "cpu_seconds_by_role": {
                role: round(seconds, 2) for role, seconds in sorted(by_role.items(), key=lambda kv: -kv[1])
            },
        }


def summary(values: Sequence[float]) -> dict[str, float]:
    """min / median / max of a non-empty list, rounded to milliseconds."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return {"min": round(ordered[0], 3), "median": round(median, 3), "max": round(ordered[-1], 3)}
