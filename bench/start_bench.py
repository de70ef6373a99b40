"""Start-up benchmark: the seed's six modes of running one command in an image, side by side in one run.

    uv run python -m bench.start_bench [--image ../shared/images/python-3.11] [--cmd "python3 -V"]
                                       [--runs 3] [--rate 100mbit] [--no-shape] [--out bench/results]

A Debian docker-registry origin holds the image (pushed from the OCI layout) and its lazy conversion;
while measuring, its port is shaped to ``--rate`` with tc HTB on loopback (``bench/p2p_shaping.py``).
Page cache dropped before every timed run (all modes, the floor too). Modes, medians of ``--runs``:

1. ``oci``: a fresh containerd pulls the original image (no mirror) and ``ctr run --rm`` runs the command;
   ``oci_skopeo``: ``skopeo copy`` + ``umoci unpack`` + chroot, a second OCIv1 reference.
2. ``lazy_cold``: ``damselfly run`` on the last peer, straight from the origin (no mirror), empty chunk cache.
3. ``p2p_cold``: ``damselfly run --mirror`` peer-0's proxy, on a fresh cluster (every store empty).
4. ``remote_peer_hit``: then on peer-1 through its proxy: peer-0 and the seed hold the pieces.
5. ``local_peer_hit``: peer-1 again, its piece store full, a new empty chunk cache.
6. ``chunk_cache_hit``: peer-1 again with the chunk cache of run 5.
Lazy modes run as on a node of a cluster: ``damselfly run --agent`` lets the node's chunk-fuse agent serve
the mount from its warm standby daemon, and the node is in its steady state when the clock starts (the
standby has finished its imports), as a node that has been up a while is.
``floor``: the command in a chroot of the image unpacked on local disk.

Results: ``<out>/start.json``, ``<out>/start.md``, ``<out>/start.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.p2p_shaping import LoopbackShaper, ShapingError, foreign_qdiscs
from bench.start_modes import (
    CLI,
    OriginLog,
    Timed,
    chroot_env,
    chroot_run,
    damselfly_run,
    drop_agent_memory,
    drop_caches,
    image_config,
    layout_tag,
    oci_containerd,
    oci_skopeo_umoci,
    opened_bytes,
    python_start,
    run_env,
    tree_bytes,
    umoci_unpack,
    wait_for_standby,
    write_run_config,
)
from bench.start_report import MODES, compare, evaluate, write_chart, write_markdown
from services.cli.cluster import LocalCluster, plan_cluster
from services.cli.origin import LocalOrigin

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEFAULT_IMAGE = (REPO / ".." / "shared" / "images" / "python-3.11").resolve()
REPOSITORY = "bench/start"


@dataclass
class Settings:
    """One run's settings, from the command line."""

    image: Path
    cmd: list[str]
    runs: int
    rate: str
    shape: bool
    out: Path
    workdir: Path | None
    peers: int
    containerd: bool
    profile: bool
    qdisc_wait: float
    bytecode_cache: bool
    report_only: bool
    compare: Path | None = None


def log(message: str) -> None:
    """Progress on stderr."""
    print(f"[start-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine_info() -> dict[str, Any]:
    """Where the figures were measured."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(int(mem) / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_at_start": os.getloadavg(),
    }


@contextlib.contextmanager
def shaping(settings: Settings, port: int) -> Iterator[LoopbackShaper | None]:
    """Shape the origin's port while measuring; wait a while for someone else's qdisc to go first."""
    if not settings.shape:
        yield None
        return
    deadline = time.monotonic() + settings.qdisc_wait
    while foreign_qdiscs() and time.monotonic() < deadline:
        log("lo already has a qdisc (another benchmark?); waiting for it to go")
        time.sleep(10)
    with LoopbackShaper(port, settings.rate) as shaper:
        yield shaper


class Bench:
    """Holds the origin, the image references and every run's record."""

    def __init__(self, settings: Settings, work: Path) -> None:
        self.settings = settings
        self.work = work
        self.origin = LocalOrigin(work / "origin")
        self.origin_log = OriginLog(work / "origin" / "access.log")
        self.runs: list[dict[str, Any]] = []
        self.tag = layout_tag(settings.image)
        self.config = image_config(settings.image, self.tag)
        self.env = chroot_env(self.config)
        self.run_env = run_env(work / "run", work / "pycache" if settings.bytecode_cache else None)
        self.original = ""
        self.lazy = ""

    def prepare(self) -> dict[str, Any]:
        """Start the origin, push the image and convert it (not shaped, not timed)."""
        self.origin.start()
        log(f"origin at {self.origin.url}; pushing {self.settings.image}")
        self.original = self.origin.push_layout(self.settings.image, self.tag, f"{REPOSITORY}:oci")
        self.lazy = f"{self.origin.host}/{REPOSITORY}:lazy"
        started = time.monotonic()
        result = subprocess.run(
            [*CLI, "convert", "--source-insecure", "--target-insecure", "--output-json",
             "--source", self.original, "--target", self.lazy],
            capture_output=True, text=True, check=False, timeout=900,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"damselfly convert failed: {result.stderr[-3000:]}")
        convert_seconds = time.monotonic() - started
        log(f"converted in {convert_seconds:.1f}s")
        layout = self.work / "floor" / "layout"
        shutil.copytree(self.settings.image, layout)  # umoci locks the layout; the shared one is read-only.
        self.rootfs = umoci_unpack(layout, self.tag, self.work / "floor" / "bundle")
        opened = opened_bytes(self.rootfs, self.settings.cmd, self.env, self.work / "strace.txt")
        log(f"the command opens {opened}")
        # Untimed: compiles the bytecode cache of every Python process of `damselfly run` (when kept).
        warm = write_run_config(self.work / "run-warmup.json", self.work / "cache-warmup")
        damselfly_run(self.lazy, warm, self.settings.cmd, None, self.run_env)
        return {"convert_seconds": round(convert_seconds, 1), "command_opens": opened}

    def measure(
        self,
        mode: str,
        run: int,
        action: Callable[[], Timed],
        peer_store: Path | None = None,
        agent: str | None = None,
    ) -> Timed:
        """Drop caches, mark the origin's log, run ``action``, record everything."""
        if agent is not None:
            wait_for_standby(agent)  # Untimed: the node's steady state.
            drop_agent_memory(agent)
        dropped = drop_caches()
        before = tree_bytes(peer_store) if peer_store else 0
        self.origin_log.mark()
        timed = action()
        record: dict[str, Any] = {
            "mode": mode,
            "run": run,
            "seconds": round(timed.seconds, 3),
            "output": timed.output,
            "page_cache_dropped": dropped,
            **self.origin_log.usage(),
        }
        if peer_store is not None:
            record["node_store_growth_bytes"] = tree_bytes(peer_store) - before
        self.runs.append(record)
        log(f"{mode} #{run}: {timed.seconds:.2f}s {timed.output!r} origin {record['origin_bytes']} B")
        return timed

    def lazy_run(self, cache: Path, mirror: str | None, agent: str | None = None) -> Callable[[], Timed]:
        """One ``damselfly run`` with the chunk cache at ``cache`` (straight to the origin without ``mirror``)."""
        config = write_run_config(self.work / f"run-{cache.name}.json", cache, direct=mirror is None)
        return lambda: damselfly_run(self.lazy, config, self.settings.cmd, mirror, self.run_env, agent=agent)

    async def cluster_round(self, run: int) -> None:
        """Modes 2-6 on a fresh cluster: the last peer without P2P; peer-0 cold, then peer-1 remote hit,
        local hit, chunk cache hit."""
        cluster_dir = self.work / f"cluster-{run}"
        plan = plan_cluster(
            cluster_dir,
            peers=self.settings.peers,
            origin=self.origin.url,
            # Lazy nodes read ranges: fetching the rest of each blob would only compete with the reads.
            prefetch=False,
        )
        cluster = LocalCluster(plan)
        await cluster.start()
        try:
            peer0, peer1, last = plan.peers[0], plan.peers[1], plan.peers[-1]
            caches = self.work / f"caches-{run}"
            steps = [
                # No mirror: nothing of this node's goes through P2P, so it leaves the others' stores alone.
                ("lazy_cold", caches / "direct", None, last),
                ("p2p_cold", caches / "p0", peer0.proxy, peer0),
                ("remote_peer_hit", caches / "p1a", peer1.proxy, peer1),
                ("local_peer_hit", caches / "p1b", peer1.proxy, peer1),
                ("chunk_cache_hit", caches / "p1b", peer1.proxy, peer1),
            ]
            for mode, cache, mirror, node in steps:
                action = self.lazy_run(cache, mirror, node.agent)
                store = cluster_dir / node.name / "pieces"
                await asyncio.to_thread(self.measure, mode, run, action, store, node.agent)
        finally:
            await cluster.stop()
            shutil.rmtree(cluster_dir, ignore_errors=True)

    async def all_modes(self) -> None:
        """Every mode, ``--runs`` times, interleaved so drift on the machine hits all modes alike."""
        settings = self.settings
        for run in range(settings.runs):
            if settings.containerd:
                pull_and_run = functools.partial(
                    oci_containerd, self.original, self.work / "ctd", settings.cmd, f"bench-{run}"
                )
                await asyncio.to_thread(self.measure, "oci", run, pull_and_run)
            await asyncio.to_thread(
                self.measure, "oci_skopeo", run,
                lambda: oci_skopeo_umoci(self.original, self.work / "skopeo", settings.cmd, self.env),
            )  # fmt: skip
            await self.cluster_round(run)
            await asyncio.to_thread(self.measure, "floor", run, self.floor)
            await asyncio.to_thread(self.measure, "python_start", run, python_start)

    def floor(self) -> Timed:
        """The command in a chroot of the image unpacked on local disk."""
        started = time.monotonic()
        output = chroot_run(self.rootfs, self.settings.cmd, self.env)
        return Timed(time.monotonic() - started, output.strip().splitlines()[0] if output.strip() else "")

    def profile(
        self, mode: str, mirror: str | None, agent: str, services: dict[str, int] | None = None
    ) -> dict[str, Any]:
        """One extra run of a lazy mode under py-spy: the CLI and its sandbox, the agent's mount daemon, and
        the cluster's ``services`` (name -> pid) a P2P run goes through."""
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        raw_cli = self.work / f"profile-{mode}-cli.txt"
        raw_daemon = self.work / f"profile-{mode}-daemon.txt"
        cache = self.work / f"cache-profile-{mode}"
        config = write_run_config(self.work / f"run-profile-{mode}.json", cache, direct=mirror is None)
        daemon_pid = wait_for_standby(agent)
        drop_caches()
        # The standby daemon serves this run's mount and exits when it is unmounted; py-spy follows it.
        daemon_spy = subprocess.Popen(
            # --nonblocking: a paused FUSE daemon cannot answer the kernel, and whatever touches the mount
            # (py-spy included) would wait for it forever.
            [
                spy,
                "record",
                "--nonblocking",
                "--pid",
                str(daemon_pid),
                "--rate",
                "250",
                "--format",
                "raw",
                "-o",
                str(raw_daemon),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        service_spies = {
            name: (
                self.work / f"profile-{mode}-{name}.txt",
                subprocess.Popen(
                    [spy, "record", "--nonblocking", "--pid", str(pid), "--rate", "250", "--format", "raw",
                     "-o", str(self.work / f"profile-{mode}-{name}.txt")],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                ),
            )
            for name, pid in (services or {}).items()
        }  # fmt: skip
        time.sleep(0.5)  # py-spy attaches before the clock starts.
        prefix = [spy, "record", "--subprocesses", "--rate", "250", "--format", "raw", "-o", str(raw_cli), "--"]
        try:
            timed = damselfly_run(
                self.lazy, config, self.settings.cmd, mirror, self.run_env, prefix=prefix, agent=agent
            )
        finally:
            try:
                daemon_spy.wait(30)
            except subprocess.TimeoutExpired:
                daemon_spy.send_signal(signal.SIGINT)
                daemon_spy.wait(30)
            for _raw, spy_process in service_spies.values():
                spy_process.send_signal(signal.SIGINT)  # py-spy writes its samples when interrupted.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    spy_process.wait(30)
        raws = [(raw_cli, "services.cli (damselfly run)"), (raw_daemon, "mount daemon (agent's standby)")]
        raws += [(raw, name) for name, (raw, _spy) in service_spies.items()]
        costs = top_costs(raws)
        return {"mode": mode, "seconds_under_py_spy": round(timed.seconds, 2), **costs}

    async def profiles(self) -> list[dict[str, Any]]:
        """Profiles of the lazy cold run (the machinery every lazy mode pays) and of P2P cold (fresh cluster)."""
        cluster_dir = self.work / "cluster-profile"
        plan = plan_cluster(
            cluster_dir,
            peers=self.settings.peers,
            origin=self.origin.url,
            # Lazy nodes read ranges: fetching the rest of each blob would only compete with the reads.
            prefetch=False,
        )
        cluster = LocalCluster(plan)
        await cluster.start()
        results = []
        try:
            results.append(await asyncio.to_thread(self.profile, "lazy_cold", None, plan.peers[-1].agent))
            # The P2P path runs in the cluster's services: profile the ones a cold read goes through too.
            wanted = {"peer-0-registry-proxy", "scheduler", "seed-fetcher", "seed-cache-store"}
            services = {
                child.spec.name: child.process.pid
                for child in cluster.children
                if child.spec.name in wanted and child.process is not None
            }
            results.append(
                await asyncio.to_thread(self.profile, "p2p_cold", plan.peers[0].proxy, plan.peers[0].agent, services)
            )
        finally:
            await cluster.stop()
            shutil.rmtree(cluster_dir, ignore_errors=True)
        return results


def top_costs(raws: list[tuple[Path, str]], count: int = 12) -> dict[str, Any]:
    """Samples per process, and by inclusive and own function, from py-spy's collapsed stacks.

    ``raws`` are py-spy outputs, each with the name of the process a stack without a process frame is of.
    Frames of the import machinery and of runpy are left out of the function tables (imports show as the
    module they load), so the tables name our code and the libraries it calls.
    """
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    processes: dict[str, int] = {}
    total = 0
    lines = [
        (line, default)
        for raw, default in raws
        if raw.exists()
        for line in raw.read_text(errors="replace").splitlines()
    ]
    for line, default in lines:
        stack, _, number = line.rpartition(" ")
        if not number.isdigit():
            continue
        samples = int(number)
        total += samples
        frames = [frame for frame in stack.split(";") if frame]
        # With --subprocesses a child's stack hangs below its parents' "process PID:CMDLINE" frames.
        marks = [i for i, frame in enumerate(frames) if frame.startswith("process ")]
        if marks:
            match = re.search(r"-m (\S+)", frames[marks[-1]])
            name = match.group(1) if match else default
            processes[name] = processes.get(name, 0) + samples
            frames = frames[marks[-1] + 1 :]
        else:
            processes[default] = processes.get(default, 0) + samples
        # "func (path:line)" -> "func (path)": costs add up per function, not per line.
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in frames if "<frozen" not in frame]
        if not frames:
            continue
        own[frames[-1]] = own.get(frames[-1], 0) + samples
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + samples

    def top(table: dict[str, int]) -> list[dict[str, Any]]:
        ranked = sorted(table.items(), key=lambda item: -item[1])[:count]
        return [{"frame": frame, "share": round(samples / max(total, 1), 3)} for frame, samples in ranked]

    return {"samples": total, "processes": top(processes), "own": top(own), "inclusive": top(inclusive)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, spread and median usage per mode, and each mode as a ratio of OCIv1 (run by run too)."""
    modes: dict[str, Any] = {}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        if not mine:
            continue
        seconds = [r["seconds"] for r in mine]
        median = statistics.median(seconds)
        entry: dict[str, Any] = {
            "runs": len(mine),
            "median_s": round(median, 3),
            "min_s": min(seconds),
            "max_s": max(seconds),
            "spread": round((max(seconds) - min(seconds)) / median, 3) if median else 0.0,
        }
        for key in ("origin_bytes", "origin_requests", "origin_blob_requests", "node_store_growth_bytes"):
            values = [r[key] for r in mine if key in r]
            if values:
                entry[key] = int(statistics.median(values))
        modes[mode] = entry
    baseline = "oci" if "oci" in modes else "oci_skopeo"
    base = modes[baseline]["median_s"]
    for mode, entry in modes.items():
        entry["ratio"] = round(entry["median_s"] / base, 4)
        # The same ratio run by run (run i of this mode against run i of OCIv1): the ratio's own noise.
        per_run = []
        for r in runs:
            if r["mode"] != mode:
                continue
            ref = next((b for b in runs if b["mode"] == baseline and b["run"] == r["run"]), None)
            if ref:
                per_run.append(r["seconds"] / ref["seconds"])
        if per_run:
            entry["ratio_min"], entry["ratio_max"] = round(min(per_run), 4), round(max(per_run), 4)
    return {"baseline": baseline, "modes": modes}


async def run(settings: Settings) -> dict[str, Any]:
    """Prepare, measure every mode under shaping, profile, and return the document."""
    work = settings.workdir or Path(tempfile.mkdtemp(prefix="damselfly-start-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(settings, work)
    doc: dict[str, Any] = {
        "settings": {
            "image": str(settings.image),
            "cmd": shlex.join(settings.cmd),
            "runs": settings.runs,
            "rate": settings.rate if settings.shape else None,
            "shaped": settings.shape,
            "peers": settings.peers,
            "containerd": settings.containerd,
            "bytecode_cache": settings.bytecode_cache,
            "page_cache": (
                "dropped before every timed run (sync; echo 3 > /proc/sys/vm/drop_caches), and so are the chunks"
                " the node agent's mount daemons hold in memory (POST /api/v1/caches/drop): an image the agent"
                " keeps mounted (as nydus-snapshotter does) reads from its disk chunk cache"
            ),
        },
        "machine": machine_info(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        doc["prepare"] = await asyncio.to_thread(bench.prepare)
        with shaping(settings, bench.origin.port) as shaper:
            await bench.all_modes()
            if shaper is not None:
                doc["tc_class_stats"] = shaper.stats()
            if settings.profile:
                log("profiling a lazy cold and a P2P cold run with py-spy")
                try:
                    doc["profiles"] = await bench.profiles()
                except Exception as exc:  # The profile is extra; the figures stand without it.
                    doc["profiles"] = [{"error": str(exc)[-500:]}]
    finally:
        doc["runs"] = bench.runs
        bench.origin.stop()
        if settings.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    doc["summary"] = summarise(bench.runs)
    doc["goals"] = evaluate(doc)
    doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return doc


def parse_args(argv: list[str] | None) -> Settings:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.start_bench",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  python -m bench.start_bench\n  python -m bench.start_bench --runs 1 --no-shape",
    )
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="an OCI layout (default the python image)")
    parser.add_argument("--cmd", default="python3 -V", help="the command to run (default 'python3 -V')")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per mode (default 5)")
    parser.add_argument("--rate", default="100mbit", help="the origin's shaped rate, a tc rate (default 100mbit)")
    parser.add_argument("--no-shape", action="store_true", help="do not shape the origin (no tc)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default bench/results)")
    parser.add_argument("--workdir", type=Path, help="keep every file under this directory")
    parser.add_argument("--peers", type=int, default=3, help="peer nodes in the cluster (default 3, at least 2)")
    parser.add_argument("--no-containerd", action="store_true", help="skip the ctr mode (skopeo+umoci is OCIv1)")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile of a lazy cold run")
    parser.add_argument("--qdisc-wait", type=float, default=1800, help="seconds to wait for a foreign qdisc on lo")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite start.md and start.png from <out>/start.json, measure nothing",
    )
    parser.add_argument(
        "--compare",
        type=Path,
        help="a start.json to check this run's ratios against (default: the one in --out, before it is replaced)",
    )
    parser.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="run damselfly as the environment says (PYTHONDONTWRITEBYTECODE: compile every import every time)",
    )
    args = parser.parse_args(argv)
    return Settings(
        image=args.image.resolve(),
        cmd=shlex.split(args.cmd),
        runs=max(1, args.runs),
        rate=args.rate,
        shape=not args.no_shape,
        out=args.out,
        workdir=args.workdir,
        peers=max(2, args.peers),
        containerd=not args.no_containerd,
        profile=not args.no_profile,
        qdisc_wait=args.qdisc_wait,
        bytecode_cache=not args.no_bytecode_cache,
        report_only=args.report_only,
        compare=args.compare,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write ``start.json``, ``start.md`` and ``start.png``."""
    settings = parse_args(argv)
    if settings.report_only:
        doc = json.loads((settings.out / "start.json").read_text())
        write_markdown(doc, settings.out / "start.md")
        write_chart(doc, settings.out / "start.png")
        return 0
    if os.geteuid() != 0:
        log("needs root: damselfly run, chroot, containerd and dropping the page cache")
        return 2
    if settings.shape:
        try:
            LoopbackShaper(0, settings.rate)  # Validates the rate before minutes of set-up.
        except ValueError as exc:
            log(str(exc))
            return 2
    # SIGTERM unwinds like Ctrl-C, so the qdisc and the cluster are always taken down.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        doc = asyncio.run(run(settings))
    except ShapingError as exc:
        log(f"shaping failed: {exc}")
        return 1
    settings.out.mkdir(parents=True, exist_ok=True)
    previous_path = settings.compare or settings.out / "start.json"
    if previous_path.is_file():
        try:
            inside = previous_path.resolve().is_relative_to(Path.cwd())
            shown = os.path.relpath(previous_path) if inside else previous_path
            doc["reproduction"] = compare(json.loads(previous_path.read_text()), doc, str(shown))
        except (ValueError, KeyError) as exc:
            log(f"cannot compare with {previous_path}: {exc!r}")
    (settings.out / "start.json").write_text(json.dumps(doc, indent=2) + "\n")
    write_markdown(doc, settings.out / "start.md")
    write_chart(doc, settings.out / "start.png")
    log(f"wrote {settings.out / 'start.json'}, start.md and start.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
