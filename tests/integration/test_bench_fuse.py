"""The FUSE benchmark harness end to end with tiny counts: it converts, mounts, unpacks, measures, reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.fuse_bench import default_layout

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _mounted_under(path: Path) -> bool:
    with open("/proc/self/mountinfo") as mountinfo:
        return any(str(path) in line for line in mountinfo)


def test_fuse_bench_writes_results_that_parse(tmp_path: Path) -> None:
    if not (default_layout() / "index.json").is_file():
        pytest.skip("the shared python image is not there")
    out, work = tmp_path / "out", tmp_path / "work"
    command = [sys.executable, "-m", "bench.fuse_bench", "--out", str(out), "--work", str(work)]
    command += ["--runs", "2", "--random-reads", "50", "--random-files", "3", "--warm", "used"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not _mounted_under(work), "the mount is gone"

    doc = json.loads((out / "fuse.json").read_text())
    settings = doc["settings"]
    assert settings["runs"] == 2 and settings["random_reads"] == 50 and len(settings["random_files"]) == 3
    assert settings["largest_file"]["bytes"] == max(f["bytes"] for f in settings["random_files"]) > 0
    m = doc["measurements"]
    assert m["order"] == [["fuse", "local"], ["local", "fuse"]]
    for key in ("sequential_cold", "sequential_warm", "random_4k_cold", "random_4k_warm"):
        for target in ("fuse", "local"):
            assert len(m[key][target]["runs"]) == 2
            assert all(v > 0 for v in m[key][target]["runs"])
            assert m[key][target]["median"] > 0
        assert m[key]["ratio_fuse_over_local"] > 0
    assert doc["fuse_backend_during_measurements"].get("chunks_fetched", 0) == 0, "the cache was warm"

    report = (out / "fuse.md").read_text()
    assert report.startswith("# FUSE throughput on a cached image")
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 4, table
    assert "FUSE / local" in table[0]
