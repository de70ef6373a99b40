"""The start-up benchmark's report: goals, the Markdown table and the seed-style bar chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.p2p_shaping import parse_rate
from shared.tasks import RANGED_PIECE_SIZE

#: Every mode in chart order, with its label and the seed's figure (python:3.9.15, read off its chart).
MODES = [
    "oci",
    "oci_skopeo",
    "lazy_cold",
    "p2p_cold",
    "remote_peer_hit",
    "local_peer_hit",
    "chunk_cache_hit",
    "floor",
    "python_start",
]
LABELS = {
    "oci": "OCIv1 (containerd)",
    "oci_skopeo": "OCIv1 (skopeo+umoci+chroot)",
    "lazy_cold": "Lazy cold (no P2P)",
    "p2p_cold": "Lazy + P2P cold",
    "remote_peer_hit": "Remote peer hit",
    "local_peer_hit": "Local peer hit",
    "chunk_cache_hit": "Chunk cache hit",
    "floor": "Floor: chroot of local unpack",
    "python_start": "Reference: bare Python start (`python -S -c pass`)",
}
SEED_SECONDS = {
    "oci": 27.1,
    "lazy_cold": 5.0,
    "p2p_cold": 5.1,
    "remote_peer_hit": 4.2,
    "local_peer_hit": 3.0,
    "chunk_cache_hit": 0.6,
}
SEED_RATIO = {mode: round(seconds / 27.1, 3) for mode, seconds in SEED_SECONDS.items()}
GOALS = {"p2p_cold": 0.12, "remote_peer_hit": 0.08, "local_peer_hit": 0.05, "chunk_cache_hit": 0.02}
ORIGIN_BYTES_GOAL = 1.5
FLOOR_GOAL = 1.5


def evaluate(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal with the measured value, whether it is met, and by what factor it is missed."""
    modes = doc["summary"]["modes"]
    goals = []
    for mode, limit in GOALS.items():
        if mode in modes:
            value = modes[mode]["ratio"]
            goals.append({"goal": f"{mode} / OCIv1 <= {limit}", "value": value, "met": value <= limit,
                          "missed_by": round(value / limit, 2)})  # fmt: skip
    if "chunk_cache_hit" in modes and "floor" in modes and modes["floor"]["median_s"]:
        value = modes["chunk_cache_hit"]["median_s"] / modes["floor"]["median_s"]
        goals.append({"goal": f"chunk_cache_hit / floor <= {FLOOR_GOAL}", "value": round(value, 2),
                      "met": value <= FLOOR_GOAL, "missed_by": round(value / FLOOR_GOAL, 2)})  # fmt: skip
    opened = doc.get("prepare", {}).get("command_opens", {}).get("bytes")
    if "p2p_cold" in modes and opened:
        value = modes["p2p_cold"]["origin_bytes"] / opened
        goals.append({"goal": f"p2p_cold origin bytes / bytes the command opens <= {ORIGIN_BYTES_GOAL}",
                      "value": round(value, 2), "met": value <= ORIGIN_BYTES_GOAL,
                      "missed_by": round(value / ORIGIN_BYTES_GOAL, 2)})  # fmt: skip
    return goals


def compare(previous: dict[str, Any], doc: dict[str, Any], source: str) -> dict[str, Any]:
    """This run's ratios against an earlier run's: a ratio is reproduced when the two runs' ratio ranges (run i
    of the mode against run i of OCIv1: the noise each run reports) overlap."""
    before, now = previous["summary"]["modes"], doc["summary"]["modes"]
    rows = []
    for mode in MODES:
        if mode not in before or mode not in now or mode == doc["summary"]["baseline"]:
            continue  # The baseline's ratio is 1 by definition.
        if "ratio_min" not in before[mode] or "ratio_min" not in now[mode]:
            continue
        old_low, old_high = before[mode]["ratio_min"], before[mode]["ratio_max"]
        low, high = now[mode]["ratio_min"], now[mode]["ratio_max"]
        rows.append(
            {
                "mode": mode,
                "previous_ratio": before[mode]["ratio"],
                "previous_range": [old_low, old_high],
                "ratio": now[mode]["ratio"],
                "range": [low, high],
                "median_change": round(now[mode]["ratio"] / before[mode]["ratio"] - 1, 3)
                if before[mode]["ratio"]
                else None,
                "reproduced": low <= old_high and old_low <= high,
            }
        )
    return {
        "previous": source,
        "previous_started": previous.get("started"),
        "previous_baseline": previous["summary"]["baseline"],
        "modes": rows,
        "all_reproduced": all(row["reproduced"] for row in rows),
    }


def _reproduction(doc: dict[str, Any]) -> list[str]:
    reproduction = doc.get("reproduction")
    if not reproduction or not reproduction["modes"]:
        return []
    verdict = "every ratio reproduced" if reproduction["all_reproduced"] else "**not every ratio reproduced**"
    lines = [
        "",
        f"## Reproduction: against the run of {reproduction['previous_started']}: {verdict}",
        "",
        "A ratio is reproduced when this run's ratio range and the earlier run's overlap (each range is the noise"
        f" its run reports: run i of the mode against run i of OCIv1).  Earlier run: `{reproduction['previous']}`"
        f" (baseline `{reproduction['previous_baseline']}`).",
        "",
        "| mode | earlier ratio | earlier range | this ratio | this range | median change | reproduced |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in reproduction["modes"]:
        change = "" if row["median_change"] is None else f"{row['median_change']:+.1%}"
        lines.append(
            f"| {LABELS.get(row['mode'], row['mode'])} | {row['previous_ratio']:.4f}"
            f" | {row['previous_range'][0]:.4f}-{row['previous_range'][1]:.4f} | {row['ratio']:.4f}"
            f" | {row['range'][0]:.4f}-{row['range'][1]:.4f} | {change} | {'yes' if row['reproduced'] else '**no**'} |"
        )
    return lines


def _mb(value: int | None) -> str:
    return "" if value is None else f"{value / 1e6:.2f}"


def _bytecode(settings: dict[str, Any]) -> str:
    if settings.get("bytecode_cache"):
        return (
            "Damselfly's Python bytecode is cached (`PYTHONPYCACHEPREFIX`, filled by one untimed warm-up run),"
            " as an installed application's would be; this machine sets `PYTHONDONTWRITEBYTECODE=1`."
        )
    return "No bytecode cache: every Python process of `damselfly run` compiles its imports at each start."


def _analysis(doc: dict[str, Any]) -> list[str]:
    """Where the time of the missed goals goes, computed from this run's own figures."""
    modes = doc["summary"]["modes"]
    settings = doc["settings"]
    needed = ("p2p_cold", "lazy_cold", "remote_peer_hit", "local_peer_hit", "chunk_cache_hit", "floor")
    if not all(mode in modes for mode in needed):
        return []
    seconds = {mode: modes[mode]["median_s"] for mode in needed}
    lines = ["", "## Where the time goes (from the medians above)", ""]
    p2p_bytes = modes["p2p_cold"].get("origin_bytes", 0)
    lazy_bytes = modes["lazy_cold"].get("origin_bytes", 0)
    pieces = p2p_bytes / RANGED_PIECE_SIZE
    if settings["shaped"]:
        rate = parse_rate(settings["rate"])
        extra_wire = max(p2p_bytes - lazy_bytes, 0) * 8 / rate
        beyond = seconds["p2p_cold"] - seconds["lazy_cold"] - extra_wire
        lines.append(
            f"* **Lazy + P2P cold** ({seconds['p2p_cold']:.2f} s against {seconds['lazy_cold']:.2f} s without P2P):"
            f" the origin sent {p2p_bytes / 1e6:.1f} MB where the lazy mount alone reads {lazy_bytes / 1e6:.1f} MB,"
            f" because the seed fetches whole pieces ({RANGED_PIECE_SIZE // 1024} KiB, the layout a range reader"
            " proposes; only those readers ask for: on-demand jobs) and a chunk read costs the pieces around it;"
            f" at {settings['rate']} the difference is {extra_wire:.2f} s on"
            f" the wire.  The other {beyond:.2f} s are the P2P hops of about {pieces:.0f} pieces, in reads taken one"
            " after another because `python3 -V` opens its files one after another: for each read the proxy's"
            " assignment request, the seed's range request to the origin (consecutive pieces in one), each piece"
            " stored on the seed before it is announced, and the node's download from the seed's cache-store"
            " (the node hands the pieces to the read from memory as soon as their digests match, and stores them"
            " meanwhile).  Five Python processes (FUSE daemon, proxy, scheduler, seed-fetcher, seed cache-store)"
            " share the machine's cores for each read, so every hop's few milliseconds of CPU is also latency."
        )
    machinery = seconds["chunk_cache_hit"] - seconds["floor"]
    python = modes.get("python_start", {}).get("median_s")
    bare_python = (
        f"  A bare start of the Python interpreter `damselfly run` is written in (`python -S -c pass`, no module"
        f" of ours) takes {python:.3f} s with the page cache dropped, {python / seconds['floor']:.1f}x the floor"
        f" by itself: a Python run command cannot come within {FLOOR_GOAL}x of the floor however little it does."
        if python and seconds["floor"]
        else ""
    )
    lines += [
        f"* **Chunk cache hit** ({seconds['chunk_cache_hit']:.2f} s against the floor's {seconds['floor']:.2f} s):"
        f" {machinery:.2f} s is the machinery, with the page cache and the daemons' memory dropped and no chunk"
        " fetched: `damselfly run`'s own start (a Python interpreter and its modules read from disk), the node"
        " agent's bind of the image it keeps mounted since the local peer hit run (as nydus-snapshotter keeps an"
        " image's mount; no daemon starts), every read of `python3 -V` going through the Python FUSE daemon to"
        " the chunk cache on disk, and the sandbox (mount namespace, overlayfs, chroot).  Reaching the floor"
        " would need reads that never leave the kernel (EROFS over fscache, as Nydus does; this kernel has"
        " EROFS) and a run command that is not a Python process, not a faster userspace daemon." + bare_python,
        f"* **Local peer hit** adds {seconds['local_peer_hit'] - seconds['chunk_cache_hit']:.2f} s: every chunk"
        " read goes to the node's registry-proxy as a range request and is served from its piece store."
        f"  **Remote peer hit** adds {seconds['remote_peer_hit'] - seconds['chunk_cache_hit']:.2f} s: the pieces"
        f" ({modes['remote_peer_hit'].get('node_store_growth_bytes', 0) / 1e6:.1f} MB, the same set peer-0"
        " read) come from peer-0 or the seed, each after an assignment, one read after another.",
    ]
    return lines


def write_markdown(doc: dict[str, Any], path: Path) -> None:
    """The table (each mode as a ratio of OCIv1 next to the seed's), the goals, the profile and the settings."""
    summary = doc["summary"]
    settings = doc["settings"]
    machine = doc["machine"]
    shaped = f"origin shaped to {settings['rate']} (tc HTB on lo)" if settings["shaped"] else "no shaping"
    lines = [
        f"# Start-up benchmark: `{settings['cmd']}` in six modes",
        "",
        f"Image `{settings['image']}`; {shaped}; {settings['peers']} peer nodes; median of {settings['runs']} runs;"
        f" page cache {settings['page_cache']}.  {_bytecode(settings)}"
        f"  Machine: {machine['cpu']}, {machine['cores']} cores,"
        f" {machine['memory_gib']} GiB, Linux {machine['kernel']}; load at start {machine['load_at_start']}."
        f"  Run {doc['started']} .. {doc['finished']}.  Ratios are of the OCIv1 baseline"
        f" (`{summary['baseline']}`) measured in the same run; the ratio range is run i of the mode against"
        " run i of the baseline.",
        "",
        "| mode | median s | min-max s | ratio of OCIv1 | ratio range | seed ratio | goal | origin MB"
        " | origin requests | node store growth MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in [m for m in summary["modes"]]:
        entry = summary["modes"][mode]
        goal = GOALS.get(mode)
        met = "" if goal is None else (f"<= {goal} " + ("met" if entry["ratio"] <= goal else "**missed**"))
        lines.append(
            f"| {LABELS.get(mode, mode)} | {entry['median_s']:.2f} | {entry['min_s']:.2f}-{entry['max_s']:.2f}"
            f" | {entry['ratio']:.3f} | {entry.get('ratio_min', 0):.3f}-{entry.get('ratio_max', 0):.3f}"
            f" | {SEED_RATIO.get(mode, '')} | {met} | {_mb(entry.get('origin_bytes'))}"
            f" | {entry.get('origin_requests', '')} | {_mb(entry.get('node_store_growth_bytes'))} |"
        )
    opened = doc.get("prepare", {}).get("command_opens", {})
    lines += [
        "",
        "How measured: wall time of the whole command (pull/mount + run + unmount), `time.monotonic` around the"
        " subprocess.  Origin bytes and requests: the docker-registry's access log lines written during the run"
        " (GET 200/206 bytes; every GET/HEAD under /v2/).  Bytes from peers: growth of the measuring node's piece"
        " store on disk (`<cluster>/<peer>/pieces`, the files the cache-store serves) during the run, i.e. what"
        " the node took in through P2P, from peers or the seed; the seed's own origin fetches show in origin MB."
        f"  The command opens {opened.get('files', '?')} files, {_mb(opened.get('bytes'))} MB (strace of the"
        " command in the unpacked chroot).",
        "",
        "## Goals",
        "",
        "| goal | value | met | measured / goal |",
        "|---|---|---|---|",
    ]
    for goal in doc["goals"]:
        lines.append(f"| {goal['goal']} | {goal['value']} | {'yes' if goal['met'] else 'no'} | {goal['missed_by']} |")
    lines += _analysis(doc)
    lines += _reproduction(doc)
    for profile in doc.get("profiles", []):
        lines += ["", f"## Where the time goes: {LABELS.get(profile.get('mode', ''), 'profile')} under py-spy", ""]
        if "error" in profile:
            lines.append(f"Profile failed: {profile['error']}")
            continue
        lines.append(
            f"One extra run, {profile['samples']} samples at 250 Hz over `damselfly run` and its sandbox, the node"
            " agent's mount daemon and, for P2P cold, the node's proxy, the scheduler and the seed"
            f" ({profile['seconds_under_py_spy']} s under py-spy; samples include idle waits: the processes"
            " table says where the samples were taken, the function tables what they were doing)."
        )
        lines += ["", "| process | share of samples |", "|---|---|"]
        lines += [f"| `{row['frame']}` | {row['share']:.1%} |" for row in profile["processes"][:6]]
        lines += ["", "| function (inclusive, import machinery left out) | share |", "|---|---|"]
        lines += [f"| `{row['frame']}` | {row['share']:.1%} |" for row in profile["inclusive"][:12]]
        lines += ["", "| function (own time) | share |", "|---|---|"]
        lines += [f"| `{row['frame']}` | {row['share']:.1%} |" for row in profile["own"][:8]]
    path.write_text("\n".join(lines) + "\n")


def write_chart(doc: dict[str, Any], path: Path) -> None:
    """Horizontal bars of the median seconds per mode, labelled with seconds and ratio, like the seed's chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = doc["summary"]["modes"]
    names = [m for m in MODES if m in modes]
    seconds = [modes[m]["median_s"] for m in names]
    colours = ["#d62728" if m.startswith("oci") else "#7f7f7f" if m == "floor" else "#1f77b4" for m in names]
    figure, axes = plt.subplots(figsize=(9, 0.55 * len(names) + 1.6))
    bars = axes.barh([LABELS[m] for m in names], seconds, color=colours)
    axes.invert_yaxis()
    for bar, mode, value in zip(bars, names, seconds, strict=True):
        seed = f", seed {SEED_RATIO[mode]}" if mode in SEED_RATIO and not mode.startswith("oci") else ""
        axes.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                  f" {value:.2f} s ({modes[mode]['ratio']:.3f}x{seed})", va="center", fontsize=9)  # fmt: skip
    settings = doc["settings"]
    shaped = f"origin {settings['rate']}" if settings["shaped"] else "no shaping"
    axes.set_xlabel("seconds (median)")
    axes.set_title(f"Time to run `{settings['cmd']}` ({shaped}, {doc['machine']['cores']} cores)")
    axes.set_xlim(0, max(seconds) * 1.45)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
