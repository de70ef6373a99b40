"""Where one P2P cold start spends its time, read by read, from the services' own OpenTelemetry spans.

Not a benchmark (nothing is compared): a diagnosis for the start-up benchmark's slowest mode.  It starts an
OTLP/HTTP receiver, a shaped origin and a local cluster whose services export their spans to it, runs the
converted image once through peer-0 with every cache empty (mode 3 of ``make bench``), and prints each blob
read the mount daemon sent to the node's registry-proxy: when it started, how long it took, how long until
the seed's request to the origin left (the P2P hops before the wire) and the piece downloads it waited for.

    uv run python -m bench.p2p_timeline            # root: tc shapes lo, the page cache is dropped
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from bench.p2p_shaping import LoopbackShaper
from bench.start_bench import DEFAULT_IMAGE, Bench, Settings
from bench.start_modes import damselfly_run_command, drop_caches, wait_for_standby, write_run_config
from services.cli.cluster import LocalCluster, plan_cluster
from shared.netutil import free_port

BLOB_ROUTE = "GET /v2/{name:path}/blobs/{digest}"


@dataclass(frozen=True, order=True)
class Span:
    """One finished span, times in nanoseconds since the epoch."""

    start: int
    end: int
    service: str
    name: str
    target: str


class SpanSink:
    """An OTLP/HTTP (protobuf) trace receiver that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []

    async def receive(self, request: web.Request) -> web.Response:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        for resource_spans in message.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), "?"
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = {a.key: a.value.string_value for a in span.attributes}
                    target = attributes.get("http.url") or attributes.get("url.full") or ""
                    self.spans.append(
                        Span(
                            span.start_time_unix_nano,
                            span.end_time_unix_nano,
                            service.removeprefix("damselfly-"),
                            span.name,
                            target,
                        )
                    )
        return web.Response()


def report(spans: list[Span], started: int, finished: int) -> list[str]:
    """The blob reads of the run, each with the hops before its bytes left the origin, and a summary."""
    mine = sorted(s for s in spans if started <= s.start <= finished)
    reads = [s for s in mine if s.service == "registry_proxy" and s.name == BLOB_ROUTE]
    lines = [f"{'at ms':>8} {'took ms':>8} {'to origin ms':>13}  pieces downloaded (ms after the read began)"]
    before_origin = []
    for read in reads:
        inside = [s for s in mine if read.start <= s.start <= read.end]
        origin = next((s for s in inside if s.service == "seed_fetcher" and s.name == "GET"), None)
        pieces = [s for s in inside if s.service == "registry_proxy" and s.name == "GET" and "/download/" in s.target]
        gap = "" if origin is None else f"{(origin.start - read.start) / 1e6:.1f}"
        if origin is not None:
            before_origin.append((origin.start - read.start) / 1e6)
        downloaded = " ".join(f"{(p.end - read.start) / 1e6:.0f}" for p in pieces)
        lines.append(
            f"{(read.start - started) / 1e6:8.1f} {(read.end - read.start) / 1e6:8.1f} {gap:>13}  {downloaded}"
        )
    took = [(r.end - r.start) / 1e6 for r in reads]
    lines += [""]
    lines.append(
        f"run {(finished - started) / 1e9:.3f} s; {len(reads)} blob reads through the proxy: {sum(took):.0f} ms"
    )
    if before_origin:
        lines.append(
            f"reads that went to the origin: {len(before_origin)}; from the read's arrival to the seed's origin"
            f" request: median {statistics.median(before_origin):.1f} ms, max {max(before_origin):.1f} ms"
        )
    return lines


async def timeline(settings: Settings) -> list[str]:
    """Run one P2P cold start with spans exported here; the report's lines."""
    sink = SpanSink()
    app = web.Application(client_max_size=256 << 20)
    app.router.add_post("/v1/traces", sink.receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    # The cluster's services inherit these: every span goes to the sink within half a second.
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{port}"
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "500"
    work = settings.workdir or Path(tempfile.mkdtemp(prefix="damselfly-p2p-timeline-"))
    bench = Bench(settings, work)
    try:
        await asyncio.to_thread(bench.prepare)
        plan = plan_cluster(work / "cluster", peers=settings.peers, origin=bench.origin.url, prefetch=False)
        cluster = LocalCluster(plan)
        await cluster.start()
        try:
            peer = plan.peers[0]
            config = write_run_config(work / "run-timeline.json", work / "cache-timeline")
            command = damselfly_run_command(bench.lazy, config, settings.cmd, peer.proxy, peer.agent)
            with LoopbackShaper(bench.origin.port, settings.rate):
                await asyncio.to_thread(wait_for_standby, peer.agent)
                drop_caches()
                started = time.time_ns()
                result = await asyncio.to_thread(subprocess.run, command, env=bench.run_env, capture_output=True)
                finished = time.time_ns()
            if result.returncode != 0:
                raise RuntimeError(f"damselfly run failed: {result.stderr.decode(errors='replace')[-2000:]}")
            await asyncio.sleep(2.0)  # The last batches of spans.
        finally:
            await cluster.stop()
    finally:
        bench.origin.stop()
        await runner.cleanup()
    return report(sink.spans, started, finished)


def main(argv: list[str] | None = None) -> int:
    """Print the timeline of one shaped P2P cold start."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="an OCI layout (default the python image)")
    parser.add_argument("--cmd", default="python3 -V", help="the command to run (default 'python3 -V')")
    parser.add_argument("--rate", default="100mbit", help="the origin's shaped rate, a tc rate (default 100mbit)")
    parser.add_argument("--peers", type=int, default=2, help="peer nodes (default 2)")
    parser.add_argument("--workdir", type=Path, help="keep every file under this directory")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root: tc on lo, dropping the page cache, damselfly run", file=sys.stderr)
        return 2
    settings = Settings(
        image=args.image.resolve(),
        cmd=shlex.split(args.cmd),
        runs=1,
        rate=args.rate,
        shape=True,
        out=Path("."),
        workdir=args.workdir,
        peers=max(1, args.peers),
        containerd=False,
        profile=False,
        qdisc_wait=0,
        bytecode_cache=True,
        report_only=False,
    )
    print("\n".join(asyncio.run(timeline(settings))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
