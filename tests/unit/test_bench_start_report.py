"""The start-up benchmark's report: a second run's ratios checked against the first's noise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.start_report import compare, write_markdown


def _doc(started: str, ratios: dict[str, tuple[float, float, float]]) -> dict[str, Any]:
    """A results document with the given (ratio, low, high) per mode; OCIv1 (skopeo) is the baseline."""
    modes: dict[str, Any] = {
        "oci_skopeo": {"median_s": 8.0, "min_s": 8.0, "max_s": 8.0, "ratio": 1.0, "ratio_min": 1.0, "ratio_max": 1.0}
    }
    for mode, (ratio, low, high) in ratios.items():
        seconds = ratio * 8.0
        modes[mode] = {
            "median_s": seconds,
            "min_s": seconds,
            "max_s": seconds,
            "ratio": ratio,
            "ratio_min": low,
            "ratio_max": high,
        }
    return {
        "started": started,
        "finished": started,
        "settings": {
            "cmd": "python3 -V",
            "image": "img",
            "runs": 3,
            "rate": None,
            "shaped": False,
            "peers": 3,
            "page_cache": "dropped",
            "bytecode_cache": True,
        },
        "machine": {"cpu": "cpu", "cores": 2, "memory_gib": 1, "kernel": "k", "load_at_start": [0, 0, 0]},
        "summary": {"baseline": "oci_skopeo", "modes": modes},
        "goals": [],
    }


def test_ratios_whose_ranges_overlap_are_reproduced_and_the_others_are_named(tmp_path: Path) -> None:
    first = _doc(
        "t1", {"lazy_cold": (0.11, 0.10, 0.12), "p2p_cold": (0.20, 0.19, 0.21), "floor": (0.003, 0.003, 0.003)}
    )
    second = _doc("t2", {"lazy_cold": (0.115, 0.113, 0.125), "p2p_cold": (0.17, 0.16, 0.18)})
    result = compare(first, second, "earlier/start.json")
    rows = {row["mode"]: row for row in result["modes"]}
    assert set(rows) == {"lazy_cold", "p2p_cold"}  # Not the baseline, not a mode the second run lacks.
    assert rows["lazy_cold"]["reproduced"] and not rows["p2p_cold"]["reproduced"]
    assert rows["p2p_cold"]["median_change"] == -0.15
    assert result["all_reproduced"] is False and result["previous_started"] == "t1"

    second["reproduction"] = result
    write_markdown(second, tmp_path / "start.md")
    markdown = (tmp_path / "start.md").read_text()
    assert "## Reproduction: against the run of t1: **not every ratio reproduced**" in markdown
    assert "| Lazy + P2P cold | 0.2000 | 0.1900-0.2100 | 0.1700 | 0.1600-0.1800 | -15.0% | **no** |" in markdown


def test_a_run_within_the_earlier_noise_reproduces_every_ratio() -> None:
    first = _doc("t1", {"lazy_cold": (0.11, 0.10, 0.12)})
    assert compare(first, _doc("t2", {"lazy_cold": (0.12, 0.12, 0.13)}), "x")["all_reproduced"] is True
