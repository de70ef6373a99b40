"""The P2P benchmark's harness runs end to end on a tiny blob, so it cannot rot between full runs.

Not a timed test: nothing here asserts a speed. It runs ``python -m bench.p2p_bench`` as `make bench-p2p`
does, but with an 8 MiB blob, N=1,2, a 16 MiB warm blob and ``--no-shape`` (no tc: the test needs no
root and must not touch the loopback qdisc other tests share), into a temp directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_the_p2p_benchmark_writes_json_markdown_and_charts(tmp_path: Path) -> None:
    out = tmp_path / "results"
    command = [
        sys.executable, "-m", "bench.p2p_bench", "--size-mib", "8", "--peers", "1,2", "--no-shape",
        "--warm-size-mib", "16", "--warm-runs", "2", "--out", str(out), "--workdir", str(tmp_path / "work"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=540, check=False)
    assert result.returncode == 0, result.stderr[-4000:]

    doc = json.loads((out / "p2p.json").read_text())
    assert doc["settings"]["shaped"] is False
    assert [entry["peers"] for entry in doc["rounds"]] == [1, 2]
    for entry in doc["rounds"]:
        for system in ("damselfly", "pull_through"):
            pulls = entry[system]["pulls"]
            assert len(pulls) == entry["peers"]
            assert all(pull["sha256_ok"] and pull["bytes"] == 8 * 1024 * 1024 for pull in pulls), pulls
            assert entry[system]["completion_vs_n1"]["max"] > 0
        # The harness's own accounting: P2P takes the blob from the origin exactly once.
        assert entry["damselfly"]["origin"]["bytes"] == 8 * 1024 * 1024
        assert entry["pull_through"]["origin"]["bytes"] >= 8 * 1024 * 1024
    assert doc["direct"]["all_ok"]
    warm = doc["warm"]
    assert {run["server"] for run in warm["runs"]} == {"damselfly", "nginx"}
    assert len(warm["runs"]) == 4
    assert warm["ratio_vs_nginx"] > 0
    assert {goal["goal"] for goal in doc["goals"]} >= {
        "origin bytes / blob size, N=1",
        "slowest peer at N=2 / N=1",
        "warm proxy GB/s / nginx sendfile GB/s",
    }

    markdown = (out / "p2p.md").read_text()
    assert "## Goals" in markdown and "## Warm serving" in markdown and "no shaping" in markdown
    for chart in ("p2p_origin_bytes.png", "p2p_completion.png"):
        assert (out / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # No qdisc was left behind or touched: --no-shape never calls tc.
    assert "tc_class_stats" not in doc
