"""Conversion benchmark: `damselfly convert` of the python image next to `umoci unpack` of the same image.

    uv run python -m bench.convert_bench [--runs 3] [--layout DIR --tag TAG]

Measured in one run on the same machine, median of ``--runs`` each:

* ``convert_layers`` alone (the library: read gzip layers, chunk, dedup, compress, write the bootstrap);
* ``damselfly convert`` end to end, registry to registry (pull, convert, push) against a local
  docker-registry holding the image, each run into a fresh repository so every blob is really uploaded;
* ``umoci unpack --rootless`` of the same image from a copy of its OCI layout: the classic way to turn
  the layers into a file tree (it writes every file to disk).

Throughput is megabytes (10**6) of uncompressed tar per second.  Sizes compare the converted image
(data blobs + bootstrap) with the gzip OCI layers.  Results go to bench/results/convert.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from services.cli.origin import LocalOrigin
from shared.image_format import ConversionOptions, convert_layers, layout_layers
from shared.oci import ConvertReport, ConvertSettings, convert_image, open_store, parse_reference

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def default_layout() -> Path:
    """The shared python-3.11 layout beside the checkout."""
    override = os.environ.get("DAMSELFLY_SHARED_DIR")
    base = Path(override) if override else REPO.parent / "shared"
    return base / "images" / "python-3.11"


def bench_library(layout: Path, tag: str, runs: int, work: Path) -> tuple[list[float], Any]:
    """convert_layers on the layout's layers, ``runs`` times; returns the times and the last stats."""
    layers = [layer.path for layer in layout_layers(layout, tag)]
    times, stats = [], None
    for i in range(runs):
        out = work / f"lib-{i}"
        started = time.perf_counter()
        result = convert_layers(layers, out, ConversionOptions())
        times.append(time.perf_counter() - started)
        stats = result.stats
        shutil.rmtree(out)
    return times, stats


async def _convert_once(source: str, target: str, work: Path) -> ConvertReport:
    async with aiohttp.ClientSession() as session:
        src = open_store(parse_reference(source), session, insecure=True)
        dst = open_store(parse_reference(target), session, insecure=True)
        return await convert_image(src, dst, ConvertSettings(work_parent=work))


def bench_registry(layout: Path, tag: str, runs: int, work: Path) -> tuple[list[float], list[ConvertReport]]:
    """`damselfly convert` registry -> registry, each run into a new repository."""
    origin = LocalOrigin(work / "origin").start()
    try:
        source = origin.push_layout(layout, tag, "library/python:3.11")
        reports = [
            asyncio.run(_convert_once(source, f"{origin.host}/bench/python-lazy-{i}:latest", work)) for i in range(runs)
        ]
    finally:
        origin.stop()
    return [r.seconds["total"] for r in reports], reports


def bench_umoci(layout: Path, tag: str, runs: int, work: Path) -> list[float]:
    """`umoci unpack --rootless` of a private copy of the layout (umoci takes a lock inside it)."""
    umoci = shutil.which("umoci")
    if umoci is None:
        raise SystemExit("umoci not found (apt-get install umoci)")
    copy = work / "umoci-layout"
    shutil.copytree(layout, copy)
    times = []
    for i in range(runs):
        bundle = work / f"bundle-{i}"
        cmd = [umoci, "unpack", "--rootless", "--image", f"{copy}:{tag}", str(bundle)]
        started = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
        shutil.rmtree(bundle)
    return times


def summarise(times: list[float], tar_bytes: int) -> dict[str, Any]:
    """Median, all runs and throughput of one measurement."""
    median = statistics.median(times)
    return {
        "median_seconds": round(median, 3),
        "runs_seconds": [round(t, 3) for t in times],
        "mb_per_second": round(tar_bytes / median / 1e6, 1),
    }


def markdown(doc: dict[str, Any]) -> str:
    """The results as a Markdown page."""
    src, tgt = doc["source"], doc["target"]
    m = doc["measurements"]
    rows = [
        ("`convert_layers` (library only)", m["convert_layers"]),
        ("`damselfly convert` registry → registry (pull + convert + push)", m["damselfly_convert"]),
        ("`umoci unpack --rootless` (writes the file tree)", m["umoci_unpack"]),
    ]
    lines = [
        "# Conversion benchmark",
        "",
        f"Image: `{doc['image']}`; {doc['runs']} runs each, median; {doc['machine']['cpus']} CPUs, "
        f"Python {doc['machine']['python']}; command: `{doc['command']}`.",
        "",
        "| what | median | runs (s) | throughput (MB/s of tar) |",
        "|---|---|---|---|",
    ]
    for name, r in rows:
        runs = ", ".join(f"{t:.2f}" for t in r["runs_seconds"])
        lines.append(f"| {name} | {r['median_seconds']:.2f} s | {runs} | {r['mb_per_second']} |")
    lines += [
        "",
        "| size | bytes | vs gzip layers |",
        "|---|---|---|",
        f"| source: gzip OCI layers ({src['layers']}) | {src['gzip_bytes']:,} | 1.000 |",
        f"| source: uncompressed tar | {src['tar_bytes']:,} | {src['tar_bytes'] / src['gzip_bytes']:.3f} |",
        f"| target: data blobs (zstd chunks) | {tgt['blob_bytes']:,} | {tgt['blob_bytes'] / src['gzip_bytes']:.3f} |",
        f"| target: bootstrap | {tgt['bootstrap_bytes']:,} | {tgt['bootstrap_bytes'] / src['gzip_bytes']:.3f} |",
        f"| target: total | {tgt['total_bytes']:,} | {tgt['ratio_vs_gzip']:.3f} |",
        "",
        f"Chunks: {tgt['chunks']:,} ({tgt['unique_chunks']:,} unique), dedup ratio {tgt['dedup_ratio']:.3f}; "
        f"{tgt['files']:,} regular files; chunk size {tgt['chunk_size']:,}, zstd level 3, blake3.",
        "",
        "Phases of `damselfly convert` (median s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in m["damselfly_convert"]["phases_median_seconds"].items())
        + ".",
        "",
        "The end-to-end time includes a local docker-registry on the same two cores (pull and push over "
        "loopback); `umoci unpack` reads the same gzip layers and writes every file, which a lazy image never does.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    """Run the benchmark and write bench/results/convert.{json,md}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--layout", type=Path, default=default_layout())
    parser.add_argument("--tag", default="python")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not (args.layout / "index.json").is_file():
        raise SystemExit(f"no OCI layout at {args.layout}")

    with tempfile.TemporaryDirectory(prefix="damselfly-bench-") as tmp:
        work = Path(tmp)
        print("convert_layers ...", file=sys.stderr)
        lib_times, stats = bench_library(args.layout, args.tag, args.runs, work)
        print("damselfly convert (registry -> registry) ...", file=sys.stderr)
        e2e_times, reports = bench_registry(args.layout, args.tag, args.runs, work)
        print("umoci unpack ...", file=sys.stderr)
        umoci_times = bench_umoci(args.layout, args.tag, args.runs, work)

    tar_bytes = stats.tar_bytes
    last = reports[-1]
    blob_bytes = last.stats["blob_bytes"]
    doc: dict[str, Any] = {
        "image": str(args.layout),
        "command": "uv run python -m bench.convert_bench",
        "runs": args.runs,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "source": {
            "layers": len(stats.layers),
            "gzip_bytes": stats.source_compressed_bytes,
            "tar_bytes": tar_bytes,
        },
        "target": {
            "chunk_size": ConversionOptions().chunk_size,
            "blob_bytes": blob_bytes,
            "bootstrap_bytes": last.bootstrap["size"],
            "total_bytes": blob_bytes + last.bootstrap["size"],
            "ratio_vs_gzip": round((blob_bytes + last.bootstrap["size"]) / stats.source_compressed_bytes, 4),
            "files": stats.files,
            "chunks": stats.chunks,
            "unique_chunks": stats.unique_chunks,
            "dedup_ratio": round(stats.dedup_ratio, 4),
            "manifest_digest": last.target_digest,
        },
        "measurements": {
            "convert_layers": summarise(lib_times, tar_bytes),
            "damselfly_convert": {
                **summarise(e2e_times, tar_bytes),
                "phases_median_seconds": {
                    phase: round(statistics.median(r.seconds[phase] for r in reports), 3)
                    for phase in ("pull", "convert", "push")
                },
            },
            "umoci_unpack": summarise(umoci_times, tar_bytes),
        },
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "convert.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.results / "convert.md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
