"""The start-up benchmark's harness runs end to end on a tiny image, so it cannot rot between full runs.

Not a timed test: nothing here asserts a speed. It runs ``python -m bench.start_bench`` as `make bench`
does, with ``--image`` and ``--cmd`` naming a tiny image of its own (a static busybox, from Debian's
busybox-static), one run per mode, ``--no-shape`` (no tc: the loopback qdisc is shared with other tests),
no containerd mode (skopeo + umoci + chroot is the OCIv1 baseline here) and no py-spy profile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.images import build_small_image

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
MODES = {"oci_skopeo", "lazy_cold", "p2p_cold", "remote_peer_hit", "local_peer_hit", "chunk_cache_hit", "floor"}
# Measured beside the modes: the bare interpreter start every Python run command pays.
REFERENCES = {"python_start"}
BUSYBOX = Path("/bin/busybox")


def tiny_image(workdir: Path) -> Path:
    """An OCI layout of a static busybox and a few files, its command printing a line."""
    image = build_small_image(
        workdir,
        {
            "bin/busybox": BUSYBOX.read_bytes(),
            "etc/motd": b"a tiny image for the start-up benchmark\n",
            "srv/data.bin": os.urandom(3 << 20),  # Some bytes the command does not read.
        },
        tag="tiny",
        cmd=["/bin/busybox", "cat", "/etc/motd"],
        modes={"bin/busybox": 0o755},
    )
    return image.layout


@pytest.mark.skipif(os.geteuid() != 0, reason="damselfly run, chroot and dropping the page cache need root")
@pytest.mark.timeout(420)
def test_the_start_benchmark_writes_json_markdown_and_chart(tmp_path: Path) -> None:
    assert BUSYBOX.is_file(), "busybox-static is missing (make system-deps installs it)"
    layout = tiny_image(tmp_path / "image")
    out = tmp_path / "results"
    command = [
        sys.executable, "-m", "bench.start_bench", "--image", str(layout), "--cmd", "/bin/busybox cat /etc/motd",
        "--runs", "1", "--no-shape", "--no-containerd", "--no-profile", "--peers", "2",
        "--out", str(out), "--workdir", str(tmp_path / "work"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400, check=False)
    assert result.returncode == 0, result.stderr[-4000:]

    doc = json.loads((out / "start.json").read_text())
    assert doc["settings"]["shaped"] is False
    assert doc["settings"]["cmd"] == "/bin/busybox cat /etc/motd"
    assert "tc_class_stats" not in doc
    assert {run["mode"] for run in doc["runs"]} == MODES | REFERENCES
    # Every mode really ran the command in the image.
    outputs = [run["output"] for run in doc["runs"] if run["mode"] in MODES]
    assert outputs == ["a tiny image for the start-up benchmark"] * len(outputs), doc["runs"]
    assert all(run["seconds"] > 0 for run in doc["runs"] if run["mode"] in REFERENCES)
    modes = doc["summary"]["modes"]
    assert doc["summary"]["baseline"] == "oci_skopeo"
    # The harness's own accounting: a cold lazy start reads from the origin, a chunk cache hit reads no chunks.
    assert modes["lazy_cold"]["origin_bytes"] > 0
    assert modes["p2p_cold"]["origin_bytes"] > 0
    assert modes["remote_peer_hit"]["node_store_growth_bytes"] > 0
    assert modes["chunk_cache_hit"]["origin_bytes"] < modes["lazy_cold"]["origin_bytes"]
    # The command opens busybox and the motd, not the 3 MiB it leaves alone.
    assert 0 < doc["prepare"]["command_opens"]["bytes"] < 3 << 20
    assert {goal["goal"].split(" ")[0] for goal in doc["goals"]} >= {"p2p_cold", "chunk_cache_hit"}

    markdown = (out / "start.md").read_text()
    assert "## Goals" in markdown and "no shaping" in markdown and "seed ratio" in markdown
    assert (out / "start.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
