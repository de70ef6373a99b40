"""P2P distribution benchmark: origin load and completion times of N peers pulling one blob at once.

    uv run python -m bench.p2p_bench [--size-mib 512] [--rate 100mbit] [--peers 1,2,4,8]
                                     [--warm-size-mib 1024] [--out bench/results] [--no-shape]

Everything runs on this machine in one run, side by side, so every figure is a ratio against a
reference measured minutes apart on the same (shared, noisy) cores:

* The origin is Debian's docker-registry; its port is shaped to ``--rate`` with tc HTB on loopback
  (``bench/p2p_shaping.py``), so it behaves like a registry across a WAN link.
* A local cluster (NATS, scheduler, seed, ``max(--peers)`` peer nodes) as ``damselfly up`` runs it.
  For each N a fresh random blob is pushed (so every cache is cold) and N peers' registry-proxies are
  asked for it at once. Measured: bytes and requests the origin served (from its access log), and
  each peer's completion time against the N=1 pull.
* The same N concurrent pulls through a fresh docker-registry pull-through cache (``proxy.remoteurl``)
  in front of the same shaped origin, and one direct pull from the origin as the floor.
* Warm serving, unshaped: a ``--warm-size-mib`` blob already in peer-0's store, fetched with
  ``curl -o /dev/null`` through the proxy and from nginx (``sendfile on``) serving the very data file
  the store holds, alternating, median of ``--warm-runs``.

Results: ``<out>/p2p.json`` (every run), ``<out>/p2p.md``, ``<out>/p2p_origin_bytes.png`` and
``<out>/p2p_completion.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.p2p_measure import CpuMeter, curl_time, process_cpu_seconds, pull_all, summary
from bench.p2p_report import write_charts, write_markdown
from bench.p2p_servers import (
    MIB,
    AccessLogWatch,
    Blob,
    NginxServer,
    origin_usage,
    push_random_image,
    registry_version,
    start_origin,
    start_pull_through_cache,
)
from bench.p2p_shaping import LoopbackShaper, ShapingError, parse_rate
from services.cli.cluster import ClusterPlan, LocalCluster, plan_cluster
from shared.tasks import task_id_for_digest
from tests.support.registry import RegistryServer

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
REPOSITORY_PREFIX = "bench/p2p"
PROFILE_RATE = 250  # py-spy samples per second
WARM_GOAL = 0.8  # the proxy's warm GB/s against nginx's


@dataclass
class Settings:
    """What one run measures, from the command line."""

    size_mib: int = 512
    rate: str = "100mbit"
    peers: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    warm_size_mib: int = 1024
    warm_runs: int = 5
    out: Path = RESULTS
    shape: bool = True
    workdir: Path | None = None
    profile_warm: bool = False
    lo_wait_seconds: float = 1800.0

    @property
    def size(self) -> int:
        """The cold blob's size in bytes."""
        return self.size_mib * MIB

    @property
    def warm_size(self) -> int:
        """The warm blob's size in bytes."""
        return self.warm_size_mib * MIB

    def command(self) -> str:
        """The command line that reproduces this run."""
        parts = ["uv run python -m bench.p2p_bench", f"--size-mib {self.size_mib}", f"--rate {self.rate}"]
        parts += [f"--peers {','.join(map(str, self.peers))}", f"--warm-size-mib {self.warm_size_mib}"]
        parts += [f"--warm-runs {self.warm_runs}"]
        if not self.shape:
            parts.append("--no-shape")
        if self.profile_warm:
            parts.append("--profile-warm")
        return " ".join(parts)


def log(message: str) -> None:
    """Progress on stderr (the results go to files)."""
    print(f"[p2p-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the machine ---------------------------------------------------------------------------------


def _first_line(command: list[str]) -> str:
    with contextlib.suppress(OSError):
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        return (result.stdout or result.stderr).strip().splitlines()[0]
    return "unknown"


def code_state() -> dict[str, Any]:
    """The commit measured, and the service files that differed from it when the cluster started."""
    head = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    status = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "services", "shared"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return {"commit": head, "uncommitted_service_files": [line[3:] for line in status.stdout.splitlines()]}


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "docker_registry": registry_version(),
        "nginx": _first_line(["nginx", "-v"]),
        "curl": _first_line(["curl", "--version"]),
        "load_average_at_start": list(os.getloadavg()),
    }


# --- the pieces of a run -------------------------------------------------------------------------


def cluster_pids(cluster: LocalCluster) -> dict[str, int | None]:
    """Every cluster process by name (NATS included), for CPU accounting."""
    pids: dict[str, int | None] = {}
    for child in cluster.children:
        pids[child.spec.name] = child.process.pid if child.process else None
    if cluster.nats_process is not None and cluster.nats_process.process is not None:
        pids["nats"] = cluster.nats_process.process.pid
    return pids


def pull_doc(results: list[Any], wall: float) -> dict[str, Any]:
    """Per-client results plus the completion summary of one concurrent pull."""
    times = [r.seconds for r in results]
    first = [r.first_byte_seconds for r in results if r.first_byte_seconds is not None]
    return {
        "pulls": [r.as_dict() for r in results],
        "all_ok": all(r.sha256_ok for r in results),
        "wall_seconds": round(wall, 3),
        "completion_seconds": summary(times),
        "first_byte_seconds": summary(first) if first else None,
    }


async def measure_pulls(
    origin: RegistryServer,
    blob: Blob,
    targets: dict[str, str],
    pids: dict[str, int | None],
    settle: Callable[[], Awaitable[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """N concurrent pulls of ``blob``: their results, the origin's load and CPU time per process.

    ``settle`` runs after the clients are done and before the origin's log is read: it waits for work
    the system still does on the origin on its own (the pull-through cache storing the blob).
    """
    mark = await asyncio.to_thread(origin.mark)
    watch = AccessLogWatch(origin, blob, mark)
    watcher = asyncio.create_task(watch.run())
    meter = CpuMeter(pids)
    meter.start()
    started = time.perf_counter()
    try:
        results, wall = await pull_all(targets, blob.digest, started)
        doc = pull_doc(results, wall)
        if settle is not None:
            doc["settle"] = await settle()
            doc["settle"]["seconds_after_start"] = round(time.perf_counter() - started, 2)
        doc["cpu"] = meter.stop()
        usage = await asyncio.to_thread(origin_usage, origin, blob, mark)
        await asyncio.to_thread(watch.poll)  # origin_usage synced the log: every line is in by now.
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    # When the origin finished sending the blob's last byte (its last blob GET), from the clients' start.
    usage["last_blob_byte_seconds"] = round(max(watch.finished) - started, 2) if watch.finished else None
    doc["origin"] = usage
    failed = [r for r in results if not r.sha256_ok]
    if failed:
        log(f"  {len(failed)} pull(s) failed: " + "; ".join(f"{r.client}: {r.status} {r.error}" for r in failed))
    return doc


async def bench_direct(session: aiohttp.ClientSession, origin: RegistryServer, settings: Settings, work: Path) -> Any:
    """One client straight from the (shaped) origin: the floor every completion time is compared with."""
    blob = await push_random_image(
        session, origin.url, f"{REPOSITORY_PREFIX}-direct", "latest", settings.size, work / "scratch.bin"
    )
    log(f"direct: 1 client from the origin, {settings.size_mib} MiB")
    doc = await measure_pulls(origin, blob, {"direct": origin.url + blob.path()}, {"origin": origin.pid})
    doc["blob"] = vars(blob)
    log(f"  {doc['completion_seconds']['max']:.1f} s, origin bytes x{doc['origin']['bytes_ratio']}")
    return doc


async def bench_round(
    session: aiohttp.ClientSession,
    origin: RegistryServer,
    plan: ClusterPlan,
    pids: dict[str, int | None],
    n: int,
    settings: Settings,
    work: Path,
) -> dict[str, Any]:
    """N peers pulling a fresh blob at once through Damselfly, then through a pull-through cache."""
    blob = await push_random_image(
        session, origin.url, f"{REPOSITORY_PREFIX}-n{n}", "latest", settings.size, work / "scratch.bin"
    )
    log(f"N={n}: damselfly, {n} peer(s) at once, {settings.size_mib} MiB {blob.digest[:19]}")
    targets = {peer.name: peer.proxy + blob.path() for peer in plan.peers[:n]}
    damselfly = await measure_pulls(origin, blob, targets, {**pids, "origin": origin.pid})
    log(
        f"  slowest {damselfly['completion_seconds']['max']:.1f} s, origin bytes x{damselfly['origin']['bytes_ratio']}"
        f" in {damselfly['origin']['blob_gets']} GETs"
    )

    log(f"N={n}: docker-registry pull-through cache, {n} client(s) at once")
    cache_dir = work / f"pull-through-n{n}"
    cache = await asyncio.to_thread(start_pull_through_cache, cache_dir, origin.url)
    # docker-registry stores the blob with an origin fetch of its own that can outlast the clients'
    # streams: its bytes count, so wait for the stored blob (a link's worth of time per stream, at most).
    link_seconds = settings.size * 8 / parse_rate(settings.rate) if settings.shape else 1.0
    wait_seconds = link_seconds * (n + 2) + 60

    async def stored() -> dict[str, Any]:
        return await wait_for_stored_blob(cache, blob, wait_seconds)

    try:
        targets = {f"client-{i}": cache.url + blob.path() for i in range(n)}
        pull_through = await measure_pulls(
            origin, blob, targets, {"origin": origin.pid, "pull-through": cache.pid}, settle=stored
        )
    finally:
        await asyncio.to_thread(cache.stop)
        shutil.rmtree(cache_dir, ignore_errors=True)
    log(
        f"  slowest {pull_through['completion_seconds']['max']:.1f} s, "
        f"origin bytes x{pull_through['origin']['bytes_ratio']}"
    )
    return {"peers": n, "blob": vars(blob), "damselfly": damselfly, "pull_through": pull_through}


async def wait_for_stored_blob(cache: RegistryServer, blob: Blob, timeout: float) -> dict[str, Any]:
    """Wait until the pull-through cache holds the whole blob in its storage (or ``timeout`` passes)."""
    hex_digest = blob.digest.removeprefix("sha256:")
    # distribution's filesystem layout: blobs are content-addressed under docker/registry/v2/blobs.
    data = cache.storage_dir / "docker" / "registry" / "v2" / "blobs" / "sha256" / hex_digest[:2] / hex_digest / "data"
    started = time.perf_counter()
    while True:
        size = await asyncio.to_thread(lambda: data.stat().st_size if data.exists() else -1)
        if size == blob.size:
            return {"blob_stored": True, "waited_seconds": round(time.perf_counter() - started, 2)}
        if time.perf_counter() - started > timeout:
            log(f"  the pull-through cache did not store the blob within {timeout:.0f} s")
            return {"blob_stored": False, "waited_seconds": round(time.perf_counter() - started, 2)}
        await asyncio.sleep(0.2)


def store_data_file(plan: ClusterPlan, peer: str, digest: str) -> Path:
    """Where a peer's piece store keeps a blob's bytes (``PieceStore.data_path``: one file per task)."""
    task_id = task_id_for_digest(digest)
    return plan.workdir / peer / "pieces" / "tasks" / task_id[:3] / f"{task_id}.data"


def _fresh_file(path: Path) -> None:
    """Make room for ``path``: its directory exists and an older run's file is gone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)


def _own_time_by_frame(raw: Path) -> dict[str, int] | None:
    """Samples per innermost frame of a py-spy raw profile; None when py-spy wrote none."""
    if not raw.exists():
        return None
    own: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if count.isdigit():
            # Without --idle py-spy samples only threads that are running, so this is where the CPU goes.
            frame = stack.split(";")[-1]
            own[frame] = own.get(frame, 0) + int(count)
    return own


async def profile_proxy(pid: int, url: str, raw: Path) -> dict[str, Any]:
    """py-spy (sampling, no pause) on the proxy while it serves ``url`` once; the top frames by own time.

    The collapsed stacks go to ``raw`` (py-spy's raw format: one ``frame;frame;... count`` line each).
    """
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        return {"error": "py-spy not installed (uv add --dev py-spy)"}
    await asyncio.to_thread(_fresh_file, raw)
    recorder = await asyncio.create_subprocess_exec(
        py_spy, "record", "--pid", str(pid), "--rate", str(PROFILE_RATE), "--nonblocking", "--threads",
        "--format", "raw", "--output", str(raw),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await asyncio.sleep(1.0)  # py-spy attaches before the request starts.
    timing = await curl_time(url)
    recorder.send_signal(signal.SIGINT)
    _, err = await recorder.communicate()
    own = await asyncio.to_thread(_own_time_by_frame, raw)
    if own is None:
        return {"error": f"py-spy failed: {err.decode(errors='replace')[-500:]}", "run": timing}
    total = sum(own.values()) or 1
    top = sorted(own.items(), key=lambda kv: -kv[1])[:15]
    return {
        "run": timing,
        "samples": total,
        # Samples a thread that never waited would give: samples / this is the busy share of one thread.
        "samples_if_always_busy": int(timing["seconds"] * PROFILE_RATE),
        "raw_profile": raw.name,
        "top_own_frames": [{"frame": frame, "share": round(count / total, 3)} for frame, count in top],
    }


async def bench_warm(
    session: aiohttp.ClientSession, origin: RegistryServer, plan: ClusterPlan, pids: dict[str, int | None],
    settings: Settings, work: Path,
) -> dict[str, Any]:  # fmt: skip
    """A blob already cached on peer-0, served to curl by its proxy and by nginx from the same file."""
    peer = plan.peers[0]
    blob = await push_random_image(
        session, origin.url, f"{REPOSITORY_PREFIX}-warm", "latest", settings.warm_size, work / "scratch.bin"
    )
    proxy_url = peer.proxy + blob.path()
    log(f"warm: filling {peer.name}'s cache with {settings.warm_size_mib} MiB (unshaped)")
    fill = await measure_pulls(origin, blob, {peer.name: proxy_url}, pids)
    if not fill["all_ok"]:
        raise RuntimeError(f"the warm-up pull through {peer.name} failed: {fill['pulls']}")
    data_file = store_data_file(plan, peer.name, blob.digest)
    if data_file.stat().st_size != blob.size:
        raise RuntimeError(f"{data_file} is {data_file.stat().st_size} bytes, expected {blob.size}")
    proxy_pid = pids.get(f"{peer.name}-registry-proxy")
    runs: list[dict[str, Any]] = []
    with NginxServer(work / "nginx", data_file) as nginx:
        urls = {"damselfly": proxy_url, "nginx": nginx.url}
        # One untimed fetch from each first: the page cache, and the proxy's first-request paths.
        for url in urls.values():
            await curl_time(url)
        for index in range(settings.warm_runs):
            # Alternate which goes first, so neither always runs right after the other's page-cache use.
            order = list(urls.items()) if index % 2 == 0 else list(reversed(urls.items()))
            for server, url in order:
                cpu_before = process_cpu_seconds(proxy_pid) if proxy_pid else None
                run = await curl_time(url)
                cpu_after = process_cpu_seconds(proxy_pid) if proxy_pid else None
                if run["status"] != 200 or run["bytes"] != blob.size:
                    raise RuntimeError(f"{server} served {run['bytes']} bytes with HTTP {run['status']}")
                run.update(server=server, run=index)
                if server == "damselfly" and cpu_before is not None and cpu_after is not None:
                    run["proxy_cpu_seconds"] = round(cpu_after - cpu_before, 3)
                runs.append(run)
                log(f"  {server:9s} run {index}: {run['seconds']:.3f} s, {run['gb_per_second']:.2f} GB/s")
    medians = {
        server: summary([r["seconds"] for r in runs if r["server"] == server])["median"]
        for server in ("damselfly", "nginx")
    }
    gbps = {server: round(blob.size / seconds / 1e9, 3) for server, seconds in medians.items()}
    ratio = round(gbps["damselfly"] / gbps["nginx"], 3)
    profile = None
    # A missed goal gets its profile at once, while the cache and the processes are as they were measured.
    if proxy_pid and (settings.profile_warm or ratio < WARM_GOAL):
        log("warm: profiling the proxy with py-spy during one more fetch")
        profile = await profile_proxy(proxy_pid, proxy_url, settings.out / "p2p_warm_profile.raw")
    return {
        "blob": vars(blob),
        "data_file": str(data_file.relative_to(plan.workdir)),
        "fill": fill,
        "runs": runs,
        "median_seconds": medians,
        "gb_per_second": gbps,
        "ratio_vs_nginx": ratio,
        "profile": profile,
    }


@contextlib.asynccontextmanager
async def shaping(settings: Settings, port: int) -> AsyncIterator[LoopbackShaper | None]:
    """The origin's port shaped to ``settings.rate`` for the duration (nothing with --no-shape)."""
    if not settings.shape:
        yield None
        return
    shaper = LoopbackShaper(port, settings.rate)
    waits = 0

    def waiting(existing: list[str]) -> None:
        nonlocal waits
        if waits % 12 == 0:  # once a minute
            log(f"lo has someone else's qdisc ({existing[0]}); waiting up to {settings.lo_wait_seconds:.0f} s")
        waits += 1

    # In a thread: the wait may be long, and the cluster's supervisor keeps running meanwhile. A
    # cancellation (Ctrl-C) ends the thread's wait, and removes the qdisc should it have just been added.
    abandon = threading.Event()
    try:
        await asyncio.to_thread(shaper.install, settings.lo_wait_seconds, waiting, abandon)
    except asyncio.CancelledError:
        abandon.set()
        shaper.remove()
        raise
    try:
        log(f"shaping 127.0.0.1:{port} (origin) to {settings.rate} with tc HTB on lo")
        yield shaper
    finally:
        shaper.remove()
        log("shaping removed")


def evaluate_goals(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal of the issue with the measured value and whether it was met."""
    goals = []
    rounds = doc["rounds"]
    for entry in rounds:
        ratio = entry["damselfly"]["origin"]["bytes_ratio"]
        goals.append(
            {
                "goal": f"origin bytes / blob size, N={entry['peers']}",
                "target": "1.00x",
                "value": ratio,
                "met": ratio <= 1.005 and entry["damselfly"]["all_ok"],
            }
        )
    base = next((r for r in rounds if r["peers"] == 1), None)
    top = max(rounds, key=lambda r: r["peers"]) if rounds else None
    if base is not None and top is not None and top is not base:
        ratio = top["damselfly"]["completion_vs_n1"]["max"]
        goals.append(
            {
                "goal": f"slowest peer at N={top['peers']} / N=1",
                "target": "<= 1.30x",
                "value": ratio,
                "met": ratio <= 1.3 and top["damselfly"]["all_ok"],
            }
        )
    warm = doc.get("warm")
    if warm is not None:
        goals.append(
            {
                "goal": "warm proxy GB/s / nginx sendfile GB/s",
                "target": ">= 0.80x",
                "value": warm["ratio_vs_nginx"],
                "met": warm["ratio_vs_nginx"] >= WARM_GOAL,
            }
        )
    return goals


def add_ratios(doc: dict[str, Any]) -> None:
    """Completion times as ratios: against the N=1 pull of the same system, and against direct."""
    rounds = doc["rounds"]
    direct = doc["direct"]["completion_seconds"]["max"]
    for system in ("damselfly", "pull_through"):
        base_round = next((r for r in rounds if r["peers"] == 1), rounds[0] if rounds else None)
        if base_round is None:
            return
        base = base_round[system]["completion_seconds"]["max"]
        for entry in rounds:
            times = entry[system]["completion_seconds"]
            entry[system]["completion_vs_n1"] = {k: round(v / base, 3) for k, v in times.items()}
            entry[system]["completion_vs_direct"] = {k: round(v / direct, 3) for k, v in times.items()}


async def run(settings: Settings) -> dict[str, Any]:
    """The whole benchmark; returns the JSON document."""
    started = time.time()
    doc: dict[str, Any] = {
        "benchmark": "p2p",
        "command": settings.command(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": machine_info(),
        "code": code_state(),
        "settings": {
            "size_mib": settings.size_mib,
            "size_bytes": settings.size,
            "rate": settings.rate if settings.shape else None,
            "rate_bits_per_second": parse_rate(settings.rate) if settings.shape else None,
            "shaped": settings.shape,
            "peers": settings.peers,
            "cluster_peers": max(settings.peers),
            "warm_size_mib": settings.warm_size_mib,
            "warm_runs": settings.warm_runs,
        },
    }
    if settings.shape:
        LoopbackShaper.preflight()
    if settings.workdir is not None:
        settings.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="damselfly-p2p-bench-", dir=settings.workdir))
    log(f"workdir {work}")
    origin = await asyncio.to_thread(start_origin, work / "origin")
    try:
        plan = plan_cluster(work / "cluster", peers=max(settings.peers), origin=origin.url)
        cluster = LocalCluster(plan)
        log(f"starting a cluster with {len(plan.peers)} peers")
        cluster_started = time.perf_counter()
        try:
            await cluster.start()
            doc["cluster_start_seconds"] = round(time.perf_counter() - cluster_started, 1)
            pids = cluster_pids(cluster)
            connector = aiohttp.TCPConnector(force_close=True)
            timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                # Warm first and unshaped: a problem there shows in seconds, not after the long cold rounds.
                doc["warm"] = await bench_warm(session, origin, plan, pids, settings, work)
                async with shaping(settings, origin.port) as shaper:
                    doc["direct"] = await bench_direct(session, origin, settings, work)
                    doc["rounds"] = []
                    for n in settings.peers:
                        entry = await bench_round(session, origin, plan, pids, n, settings, work)
                        # Another program's cleanup could have removed our qdisc mid-round: say so in the results.
                        entry["shaping_intact"] = shaper.intact() if shaper is not None else None
                        if shaper is not None and not entry["shaping_intact"]:
                            log(f"  WARNING: the shaping was gone after N={n}; this round ran (partly) unshaped")
                        doc["rounds"].append(entry)
                    if shaper is not None:
                        doc["tc_class_stats"] = shaper.stats()
            doc["restarts"] = {child.spec.name: child.restarts for child in cluster.children if child.restarts}
        finally:
            await cluster.stop()
    finally:
        await asyncio.to_thread(origin.stop)
        if settings.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    add_ratios(doc)
    doc["goals"] = evaluate_goals(doc)
    doc["machine"]["load_average_at_end"] = list(os.getloadavg())
    doc["wall_seconds"] = round(time.time() - started, 1)
    return doc


def write_results(doc: dict[str, Any], out: Path) -> None:
    """p2p.json, p2p.md and the two charts."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "p2p.json").write_text(json.dumps(doc, indent=2) + "\n")
    write_charts(doc, out)
    write_markdown(doc, out)


async def _main(settings: Settings) -> dict[str, Any]:
    # SIGTERM and SIGHUP cancel the run like Ctrl-C does, so every finally (tc qdisc del first) runs.
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for signum in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, task.cancel)
    return await run(settings)


def parse_args(argv: list[str] | None) -> Settings:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Examples:\n"
            "  uv run python -m bench.p2p_bench                       # the full run (~20 min, needs root for tc)\n"
            "  uv run python -m bench.p2p_bench --size-mib 32 --peers 1,2 --warm-size-mib 64 --out /tmp/p2p\n"
            "  uv run python -m bench.p2p_bench --size-mib 8 --peers 1,2 --no-shape --warm-size-mib 16\n"
        ),
    )
    parser.add_argument("--size-mib", type=int, default=512, help="size of the blob N peers pull (default 512)")
    parser.add_argument("--rate", default="100mbit", help="the origin's shaped rate, a tc rate (default 100mbit)")
    parser.add_argument("--peers", default="1,2,4,8", help="comma-separated N to measure (default 1,2,4,8)")
    parser.add_argument("--warm-size-mib", type=int, default=1024, help="size of the warm blob (default 1024)")
    parser.add_argument("--warm-runs", type=int, default=5, help="timed warm fetches per server (default 5)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default bench/results)")
    parser.add_argument("--no-shape", action="store_true", help="do not shape the origin (no tc, no root needed)")
    parser.add_argument("--workdir", type=Path, help="keep the servers' files under this directory")
    parser.add_argument(
        "--lo-wait",
        type=float,
        default=1800.0,
        help="seconds to wait for another program's qdisc on lo to go before giving up (default 1800)",
    )
    parser.add_argument(
        "--profile-warm",
        action="store_true",
        help="py-spy the proxy during one more warm fetch (done anyway when the warm goal is missed)",
    )
    args = parser.parse_args(argv)
    try:
        peers = sorted({int(n) for n in args.peers.split(",") if n.strip()})
        parse_rate(args.rate)
    except ValueError as exc:
        parser.error(str(exc))
    if not peers or peers[0] < 1:
        parser.error("--peers needs positive numbers")
    if args.size_mib < 1 or args.warm_size_mib < 1 or args.warm_runs < 1:
        parser.error("sizes and --warm-runs must be positive")
    return Settings(
        size_mib=args.size_mib,
        rate=args.rate,
        peers=peers,
        warm_size_mib=args.warm_size_mib,
        warm_runs=args.warm_runs,
        out=args.out,
        shape=not args.no_shape,
        workdir=args.workdir,
        profile_warm=args.profile_warm,
        lo_wait_seconds=args.lo_wait,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its results."""
    settings = parse_args(argv)
    try:
        doc = asyncio.run(_main(settings))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted; everything was stopped and the shaping removed")
        return 130
    except ShapingError as exc:
        log(f"cannot shape the origin: {exc}")
        return 2
    write_results(doc, settings.out)
    log(f"results in {settings.out}")
    print((settings.out / "p2p.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
