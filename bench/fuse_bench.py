"""FUSE throughput on a cached image, side by side with the same reads on the unpacked image on local disk.

    uv run python -m bench.fuse_bench [--out bench/results] [--runs 5] [--random-reads 4000]

One run, one machine:

1. the python image (``/work/shared/images/python-3.11``) is pushed to a local docker-registry
   (``LocalOrigin``) and converted next to itself, unless ``--work`` already holds that conversion;
2. it is mounted with ``damselfly mount`` (its own daemon, libfuse3) and every regular file is read once
   through the mount, so the chunk cache on disk is warm and no read below touches the network;
3. the same image is unpacked with ``umoci unpack`` to local disk (kept in ``--work`` too);
4. each measurement runs ``--runs`` times on both trees, alternating which goes first, and the median wins:

   * sequential read of the largest regular file (1 MiB ``readinto``), page cache dropped first
     (``sync; echo 3 > /proc/sys/vm/drop_caches``), then again warm (page cache full);
   * ``--random-reads`` ``pread``s of 4 KiB at 4 KiB-aligned random offsets over the ``--random-files``
     largest files (offsets uniform over their bytes, fixed ``--seed``, the same list on both trees),
     page cache dropped first, then the same list again warm.

GB/s are 10**9 bytes per second.  Results: ``<out>/fuse.json`` (every run) and ``<out>/fuse.md``.
The mount is always unmounted and the registry stopped, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import stat
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp

from services.chunk_fuse.control import mount_stats
from services.chunk_fuse.rundir import is_mounted
from services.cli.origin import LocalOrigin
from shared.image_format import ConversionOptions
from shared.oci import ConvertSettings, convert_image, open_store, parse_reference

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEFAULT_WORK = Path("/var/tmp/damselfly-fuse-bench")
REPOSITORY = "bench/python"
SOURCE_TAG = "3.11"
LAZY_TAG = "3.11-lazy"
BLOCK = 4096
SEQ_BUFFER = 1 << 20
MANIFEST_ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
TARGETS = ("fuse", "local")


def log(message: str) -> None:
    print(f"[fuse_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def default_layout() -> Path:
    """The shared python-3.11 layout beside the checkout."""
    override = os.environ.get("DAMSELFLY_SHARED_DIR")
    base = Path(override) if override else REPO.parent / "shared"
    return base / "images" / "python-3.11"


# -- preparing the two trees ------------------------------------------------------------------------------


def has_manifest(origin: LocalOrigin, repository: str, tag: str) -> bool:
    request = urllib.request.Request(
        f"{origin.url}/v2/{repository}/manifests/{tag}", method="HEAD", headers={"Accept": MANIFEST_ACCEPT}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError:
        return False


async def _convert(source: str, target: str) -> None:
    async with aiohttp.ClientSession() as session:
        await convert_image(
            open_store(parse_reference(source), session, insecure=True),
            open_store(parse_reference(target), session, insecure=True),
            ConvertSettings(options=ConversionOptions()),
        )


def prepare_origin(origin: LocalOrigin, layout: Path, tag: str) -> dict[str, Any]:
    """The converted image in the origin: reused when the registry storage already has it."""
    lazy = f"{origin.host}/{REPOSITORY}:{LAZY_TAG}"
    if has_manifest(origin, REPOSITORY, LAZY_TAG):
        log(f"reusing the conversion in {origin.workdir}")
        return {"reference": lazy, "reused": True, "convert_seconds": None}
    log("pushing the image and converting it ...")
    source = origin.push_layout(layout, tag, f"{REPOSITORY}:{SOURCE_TAG}")
    started = time.perf_counter()
    asyncio.run(_convert(source, lazy))
    return {"reference": lazy, "reused": False, "convert_seconds": round(time.perf_counter() - started, 3)}


def prepare_unpacked(layout: Path, tag: str, work: Path) -> tuple[Path, bool]:
    """``umoci unpack`` (as root: owners kept) of a private copy of the layout; reused when complete."""
    bundle = work / "bundle"
    done = work / "bundle.done"
    if done.exists() and (bundle / "rootfs").is_dir():
        log(f"reusing the unpacked image in {bundle}")
        return bundle / "rootfs", True
    umoci = shutil.which("umoci")
    if umoci is None:
        raise SystemExit("umoci not found (apt-get install umoci)")
    shutil.rmtree(bundle, ignore_errors=True)
    copy = work / "umoci-layout"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(layout, copy)  # umoci takes a lock inside the layout
    log("umoci unpack ...")
    subprocess.run([umoci, "unpack", "--image", f"{copy}:{tag}", str(bundle)], check=True, capture_output=True)
    shutil.rmtree(copy, ignore_errors=True)
    done.write_text("ok\n")
    return bundle / "rootfs", False


def regular_files(root: Path) -> list[tuple[str, int]]:
    """(relative path, size) of every regular file, one name per inode, largest first."""
    seen: set[tuple[int, int]] = set()
    out: list[tuple[str, int]] = []
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            out.append((os.path.relpath(path, root), st.st_size))
    out.sort(key=lambda item: (-item[1], item[0]))
    return out


# -- the mount ----------------------------------------------------------------------------------------------


def cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
        cwd=REPO,
    )


@contextlib.contextmanager
def mounted(reference: str, mountpoint: Path, config: Path, run_dir: Path) -> Iterator[Path]:
    """``damselfly mount`` ... ``damselfly umount --lazy``, then ``fusermount3 -u -z`` as the last resort."""
    env = {**os.environ, "DAMSELFLY_RUN_DIR": str(run_dir)}
    mountpoint.mkdir(parents=True, exist_ok=True)
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
    try:
        result = cli("mount", reference, str(mountpoint), "--config", str(config), "--insecure", env=env)
        if result.returncode != 0:
            raise SystemExit(f"damselfly mount failed: {result.stderr.strip()}")
        yield mountpoint
    finally:
        with contextlib.suppress(Exception):
            cli("umount", str(mountpoint), "--lazy", env=env, timeout=60)
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


def read_all(root: Path, files: list[tuple[str, int]]) -> int:
    """Read every file once (1 MiB at a time); returns the bytes read."""
    buffer = bytearray(SEQ_BUFFER)
    total = 0
    for rel, _size in files:
        with open(root / rel, "rb", buffering=0) as handle:
            while n := handle.readinto(buffer):
                total += n
    return total


# -- measurements -------------------------------------------------------------------------------------------


def drop_caches() -> bool:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``; False when not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
    except OSError:
        return False
    return True


def sequential_read(path: Path) -> tuple[float, int]:
    """Seconds to read the whole file (open included) and the bytes read."""
    buffer = bytearray(SEQ_BUFFER)
    total = 0
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            total += n
    return time.perf_counter() - started, total


def random_plan(files: list[tuple[str, int]], count: int, seed: int) -> list[tuple[int, int]]:
    """(file index, 4 KiB-aligned offset) pairs, uniform over the files' bytes."""
    rng = random.Random(seed)
    blocks = [max(1, size // BLOCK) for _rel, size in files]
    weights = list(blocks)
    plan = []
    for index in rng.choices(range(len(files)), weights=weights, k=count):
        plan.append((index, rng.randrange(blocks[index]) * BLOCK))
    return plan


def random_reads(root: Path, files: list[tuple[str, int]], plan: list[tuple[int, int]]) -> float:
    """Seconds for the planned 4 KiB preads (files opened before the clock starts)."""
    fds = [os.open(root / rel, os.O_RDONLY) for rel, _size in files]
    try:
        pread = os.pread
        started = time.perf_counter()
        for index, offset in plan:
            pread(fds[index], BLOCK, offset)
        return time.perf_counter() - started
    finally:
        for fd in fds:
            os.close(fd)


def summary(values: list[float], unit: str) -> dict[str, Any]:
    return {"median": statistics.median(values), "runs": values, "unit": unit}


def measure(
    roots: dict[str, Path],
    largest: tuple[str, int],
    random_files: list[tuple[str, int]],
    plan: list[tuple[int, int]],
    runs: int,
    drop: bool,
) -> dict[str, Any]:
    """Every measurement ``runs`` times on both trees, alternating which goes first."""
    seq_cold: dict[str, list[float]] = {t: [] for t in TARGETS}
    seq_warm: dict[str, list[float]] = {t: [] for t in TARGETS}
    rnd_cold: dict[str, list[float]] = {t: [] for t in TARGETS}
    rnd_warm: dict[str, list[float]] = {t: [] for t in TARGETS}
    order_log = []
    dropped_all = True

    def cold() -> None:
        nonlocal dropped_all
        if drop:
            dropped_all = drop_caches() and dropped_all

    for run in range(runs):
        order = TARGETS if run % 2 == 0 else TARGETS[::-1]
        order_log.append(list(order))
        for target in order:
            path = roots[target] / largest[0]
            cold()
            seconds, size = sequential_read(path)
            if size != largest[1]:
                raise SystemExit(f"{path}: read {size} bytes, expected {largest[1]}")
            seq_cold[target].append(size / seconds / 1e9)
            seconds, size = sequential_read(path)
            seq_warm[target].append(size / seconds / 1e9)
        for target in order:
            cold()
            seconds = random_reads(roots[target], random_files, plan)
            rnd_cold[target].append(len(plan) / seconds)
            seconds = random_reads(roots[target], random_files, plan)
            rnd_warm[target].append(len(plan) / seconds)
        log(
            f"run {run + 1}/{runs}: seq cold fuse {seq_cold['fuse'][-1]:.2f} / local {seq_cold['local'][-1]:.2f} GB/s; "
            f"rand cold fuse {rnd_cold['fuse'][-1]:,.0f} / local {rnd_cold['local'][-1]:,.0f} ops/s"
        )

    def pack(values: dict[str, list[float]], unit: str, digits: int) -> dict[str, Any]:
        out = {t: summary([round(v, digits) for v in values[t]], unit) for t in TARGETS}
        out["ratio_fuse_over_local"] = round(out["fuse"]["median"] / out["local"]["median"], 3)
        return out

    return {
        "order": order_log,
        "page_cache_dropped": drop and dropped_all,
        "sequential_cold": pack(seq_cold, "GB/s", 3),
        "sequential_warm": pack(seq_warm, "GB/s", 3),
        "random_4k_cold": pack(rnd_cold, "ops/s", 0),
        "random_4k_warm": pack(rnd_warm, "ops/s", 0),
    }


# -- report -----------------------------------------------------------------------------------------------


ROWS = (
    ("sequential_cold", "sequential read of the largest file, page cache dropped", "GB/s"),
    ("sequential_warm", "sequential read of the largest file, warm page cache", "GB/s"),
    ("random_4k_cold", "random 4 KiB `pread`, page cache dropped", "ops/s"),
    ("random_4k_warm", "random 4 KiB `pread`, warm page cache", "ops/s"),
)


def _fmt(value: float, unit: str) -> str:
    return f"{value:.2f}" if unit == "GB/s" else f"{value:,.0f}"


def markdown(doc: dict[str, Any]) -> str:
    """The results as a Markdown page."""
    m = doc["measurements"]
    s = doc["settings"]
    machine = doc["machine"]
    lines = [
        "# FUSE throughput on a cached image",
        "",
        f"Image: `{doc['image']}` converted and mounted with `damselfly mount` (chunk cache on disk warm: every "
        f"file read once first, {doc['warmup']['bytes'] / 1e6:.1f} MB in {doc['warmup']['seconds']:.1f} s), "
        "against the same image unpacked by `umoci unpack` to local disk; same run, alternating which goes "
        f"first, median of {s['runs']}.",
        "",
        "| measurement | unit | FUSE | local disk | FUSE / local | FUSE runs | local runs |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, name, unit in ROWS:
        r = m[key]
        runs = {t: ", ".join(_fmt(v, unit) for v in r[t]["runs"]) for t in TARGETS}
        lines.append(
            f"| {name} | {unit} | {_fmt(r['fuse']['median'], unit)} | {_fmt(r['local']['median'], unit)} | "
            f"{r['ratio_fuse_over_local']:.2f} | {runs['fuse']} | {runs['local']} |"
        )
    backend = doc.get("fuse_backend_during_measurements", {})
    lines += [
        "",
        "Settings:",
        "",
        f"* largest file: `/{s['largest_file']['path']}`, {s['largest_file']['bytes']:,} bytes, read with a "
        f"{SEQ_BUFFER // 1024} KiB buffer (open included);",
        f"* random reads: {s['random_reads']:,} `pread`s of {BLOCK} B at aligned offsets over the "
        f"{len(s['random_files'])} largest files ({s['random_files_bytes'] / 1e6:.1f} MB), seed {s['seed']}, "
        "uniform over their bytes, same list on both trees, files opened before the clock starts;",
        f"* page cache dropped before each cold run: {m['page_cache_dropped']} "
        "(`sync; echo 3 > /proc/sys/vm/drop_caches`); each warm run follows its cold run at once;",
        f"* mount: {s['mount_config']}; chunk size {s['chunk_size']:,} B; "
        f"image served by a local docker-registry on loopback (conversion reused: {doc['conversion']['reused']});",
        f"* chunks fetched from the registry during the measurements: {backend.get('chunks_fetched', 'n/a')} "
        f"(chunks read from the disk cache: {backend.get('chunks_from_disk', 'n/a')});",
        f"* machine: {machine['cpus']} CPUs, {machine['platform']}, Python {machine['python']}, load average "
        f"{machine['loadavg_start'][0]:.2f} at the start and {machine['loadavg_end'][0]:.2f} at the end "
        "(a shared, noisy machine: compare the columns, not the absolute figures);",
        f"* local disk: `{s['local_root']}` on {s['local_fs']}.",
        "",
        f"Command: `{doc['command']}`",
        "",
    ]
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------------------


def filesystem_of(path: Path) -> str:
    result = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=False)
    return result.stdout.strip() or "unknown"


def reads_counters(mountpoint: Path, run_dir: Path) -> dict[str, int]:
    try:
        reads: dict[str, Any] = mount_stats(mountpoint, run_dir)["reads"]
    except Exception:  # statistics are informative only
        return {}
    return {k: int(v) for k, v in reads.items() if isinstance(v, int | float)}


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    work: Path = args.work.resolve()
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    loadavg_start = os.getloadavg()
    local_root, unpack_reused = prepare_unpacked(args.layout, args.tag, work)
    files = regular_files(local_root)
    largest = files[0]
    random_files = files[: args.random_files]
    plan = random_plan(random_files, args.random_reads, args.seed)
    config_doc = {"cache": {"work_dir": str(work / "cache")}}
    config = work / "mount.json"
    config.write_text(json.dumps(config_doc))
    run_dir = work / "run"
    origin = LocalOrigin(work / "origin")
    origin.start()
    try:
        conversion = prepare_origin(origin, args.layout, args.tag)
        with mounted(conversion["reference"], work / "mnt", config, run_dir) as mnt:
            warm_files = files if args.warm == "all" else random_files
            log(f"warming the chunk cache: reading {len(warm_files):,} files through the mount ...")
            started = time.perf_counter()
            warm_bytes = read_all(mnt, warm_files)
            warm_seconds = time.perf_counter() - started
            for rel, size in random_files:
                if os.stat(mnt / rel).st_size != size:
                    raise SystemExit(f"/{rel}: size differs between the mount and the unpacked image")
            before = reads_counters(mnt, run_dir)
            log(f"measuring: {args.runs} runs, {args.random_reads:,} random reads each ...")
            measurements = measure(
                {"fuse": mnt, "local": local_root}, largest, random_files, plan, args.runs, not args.no_drop_caches
            )
            after = reads_counters(mnt, run_dir)
    finally:
        origin.stop()
    backend = {k: after.get(k, 0) - before.get(k, 0) for k in ("chunks_fetched", "chunks_from_disk") if k in after}
    return {
        "image": str(args.layout),
        "command": command,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_start": [round(x, 2) for x in loadavg_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": {
            "runs": args.runs,
            "random_reads": args.random_reads,
            "seed": args.seed,
            "largest_file": {"path": largest[0], "bytes": largest[1]},
            "random_files": [{"path": rel, "bytes": size} for rel, size in random_files],
            "random_files_bytes": sum(size for _rel, size in random_files),
            "block_bytes": BLOCK,
            "sequential_buffer_bytes": SEQ_BUFFER,
            "mount_config": config_doc,
            "chunk_size": ConversionOptions().chunk_size,
            "warm": args.warm,
            "work": str(work),
            "local_root": str(local_root),
            "local_fs": filesystem_of(local_root),
        },
        "conversion": {**conversion, "unpack_reused": unpack_reused},
        "warmup": {"files": len(warm_files), "bytes": warm_bytes, "seconds": round(warm_seconds, 3)},
        "fuse_backend_during_measurements": backend,
        "measurements": measurements,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="where fuse.json and fuse.md go")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--random-reads", type=int, default=4000)
    parser.add_argument("--random-files", type=int, default=8, help="random reads spread over the N largest files")
    parser.add_argument("--seed", type=int, default=20240611)
    parser.add_argument("--layout", type=Path, default=default_layout())
    parser.add_argument("--tag", default="python")
    parser.add_argument(
        "--work", type=Path, default=DEFAULT_WORK, help="registry storage, unpacked image, chunk cache (reused)"
    )
    parser.add_argument("--fresh", action="store_true", help="convert and unpack again")
    parser.add_argument(
        "--warm", choices=("all", "used"), default="all", help="read every file first, or only the measured ones"
    )
    parser.add_argument("--no-drop-caches", action="store_true")
    args = parser.parse_args(argv)
    if not (args.layout / "index.json").is_file():
        parser.error(f"no OCI layout at {args.layout}")
    if args.runs < 1 or args.random_reads < 1 or args.random_files < 1:
        parser.error("--runs, --random-reads and --random-files must be positive")
    return args


def main(argv: list[str] | None = None, print_report: Callable[[str], None] = print) -> None:
    """Run the benchmark and write ``<out>/fuse.{json,md}``."""
    args = parse_args(argv)
    command = "uv run python -m bench.fuse_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    doc = run(args, command.strip())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fuse.json").write_text(json.dumps(doc, indent=2) + "\n")
    report = markdown(doc)
    (args.out / "fuse.md").write_text(report)
    print_report(report)


if __name__ == "__main__":
    main()
