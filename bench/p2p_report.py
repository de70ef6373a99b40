"""The P2P benchmark's Markdown page and charts, made from its JSON document alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # Files only: no display on a server.
import matplotlib.pyplot as plt
from matplotlib import ticker

GOAL_COMPLETION_RATIO = 1.3
GOAL_WARM_RATIO = 0.8
SYSTEM_LABELS = {"damselfly": "Damselfly (P2P)", "pull_through": "docker-registry pull-through cache"}


def _mib(size: int) -> str:
    return f"{size / 1024 / 1024:,.0f} MiB"


def _seconds(times: dict[str, float]) -> str:
    return f"{times['min']:.1f} / {times['median']:.1f} / {times['max']:.1f}"


def _requests(origin: dict[str, Any]) -> str:
    kinds = origin["requests_by_kind"]
    return (
        f"{origin['requests']} ({kinds.get('GET blob', 0)} blob GET, {kinds.get('HEAD blob', 0)} blob HEAD, "
        f"{origin['requests'] - kinds.get('GET blob', 0) - kinds.get('HEAD blob', 0)} other)"
    )


def _top_roles(cpu: dict[str, Any], count: int = 4) -> str:
    roles = list(cpu["cpu_seconds_by_role"].items())[:count]
    return ", ".join(f"{role} {seconds:.1f}" for role, seconds in roles)


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _met(goal: dict[str, Any]) -> str:
    return "met" if goal["met"] else "**missed**"


def machine_lines(doc: dict[str, Any]) -> list[str]:
    """The machine and the settings, so a reader can judge the numbers."""
    machine, settings = doc["machine"], doc["settings"]
    shaping = (
        f"the origin's port shaped to **{settings['rate']}** with tc HTB on `lo` (server-to-client direction "
        "only; all other loopback traffic in a 100 Gbit/s default class)"
        if settings["shaped"]
        else "**no shaping** (`--no-shape`): the origin answers at loopback speed, so completion ratios say little"
    )
    load_start = ", ".join(f"{x:.2f}" for x in machine["load_average_at_start"])
    load_end = ", ".join(f"{x:.2f}" for x in machine.get("load_average_at_end", []))
    code = doc.get("code", {})
    dirty = code.get("uncommitted_service_files") or []
    code_line = f"Code: commit {code.get('commit', '?')}" + (
        f", with uncommitted changes to {', '.join(f'`{f}`' for f in dirty)}." if dirty else ", clean."
    )
    return [
        f"Run {doc['started_at']}, {doc['wall_seconds'] / 60:.1f} min; command: `{doc['command']}`. {code_line}",
        "",
        f"Machine: {machine['cpus']} CPUs ({machine['cpu_model']}), {machine['memory_gib']} GiB RAM, Linux "
        f"{machine['kernel']}, Python {machine['python']}; {machine['docker_registry']}; {machine['nginx']}; "
        f"{machine['curl'].split(' (')[0]}. The machine is shared with other work: load average (1/5/15 min) "
        f"{load_start} at the start, {load_end} at the end.",
        "",
        f"Settings: cold blob {_mib(settings['size_bytes'])} of random bytes; {shaping}. One cluster of "
        f"{settings['cluster_peers']} peer nodes (NATS, scheduler, seed, and per peer a registry-proxy, "
        f"cache-store and chunk-fuse agent; {doc.get('cluster_start_seconds', '?')} s to start) serves every N; "
        "each N pulls a freshly pushed random blob, so every cache is cold. The pull-through cache is a fresh "
        "docker-registry in proxy mode per N, in front of the same shaped origin. Clients are aiohttp GETs of "
        "`/v2/<name>/blobs/<digest>`, started together, each hashing what it gets (every pull below was checked "
        "against the digest unless marked).",
        "",
    ]


def goals_lines(doc: dict[str, Any]) -> list[str]:
    """The issue's goals, measured."""
    lines = ["## Goals", "", "| goal | target | measured | |", "|---|---|---|---|"]
    for goal in doc["goals"]:
        lines.append(f"| {goal['goal']} | {goal['target']} | {goal['value']:.3f}x | {_met(goal)} |")
    return [*lines, ""]


def origin_lines(doc: dict[str, Any]) -> list[str]:
    """Origin bytes and requests per N, Damselfly next to the pull-through cache."""
    lines = [
        "## Origin load: N clients pulling one blob at once",
        "",
        "Bytes are what the origin's access log says it sent for the blob (GET 200/206); requests are all "
        "the origin logged during the pull. For the pull-through cache that includes the origin fetch it makes "
        "to store the blob, which can outlast the clients' streams: its origin load is read once the blob is in "
        "its storage.",
        "",
        "| N | Damselfly origin bytes | ÷ blob | Damselfly origin requests | pull-through origin bytes | ÷ blob "
        "| pull-through origin requests |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in doc["rounds"]:
        d, p = entry["damselfly"]["origin"], entry["pull_through"]["origin"]
        lines.append(
            f"| {entry['peers']} | {d['bytes']:,} | **{d['bytes_ratio']:.3f}x** | {_requests(d)} | {p['bytes']:,} "
            f"| {p['bytes_ratio']:.3f}x | {_requests(p)} |"
        )
    direct = doc["direct"]["origin"]
    broken = [str(entry["peers"]) for entry in doc["rounds"] if entry.get("shaping_intact") is False]
    if broken:
        lines += ["", f"**Warning: the shaping was gone after N={', '.join(broken)}** (removed by another program)."]
    lines += ["", f"Direct pull (1 client, no cache): {direct['bytes']:,} bytes, {_requests(direct)}.", ""]
    return lines


def completion_lines(doc: dict[str, Any]) -> list[str]:
    """Per-client completion times and their ratios."""
    direct = doc["direct"]
    direct_s = direct["completion_seconds"]["max"]
    size = doc["settings"]["size_bytes"]
    lines = [
        "## Completion times",
        "",
        f"Direct from the origin, one client: **{direct_s:.1f} s** ({size * 8 / direct_s / 1e6:.1f} Mbit/s), "
        "the floor for any cold pull. Times are from the moment all N GETs start to each client's last byte; "
        "min / median / max over the N clients.",
        "",
        "| N | Damselfly (s) | slowest ÷ N=1 | slowest ÷ direct | pull-through (s) | slowest ÷ its N=1 "
        "| slowest ÷ direct |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in doc["rounds"]:
        d, p = entry["damselfly"], entry["pull_through"]
        bad = "" if d["all_ok"] else " (some pulls FAILED)"
        bad_p = "" if p["all_ok"] else " (some pulls FAILED)"
        lines.append(
            f"| {entry['peers']} | {_seconds(d['completion_seconds'])}{bad} | **{d['completion_vs_n1']['max']:.3f}x** "
            f"| {d['completion_vs_direct']['max']:.3f}x | {_seconds(p['completion_seconds'])}{bad_p} "
            f"| {p['completion_vs_n1']['max']:.3f}x | {p['completion_vs_direct']['max']:.3f}x |"
        )
    lines += [
        "",
        "### Where the time goes (Damselfly)",
        "",
        "*Origin done* is when the origin's access-log line for its last blob GET appeared (the registry writes "
        "it once the handler has handed the last byte to the kernel; up to a few MiB of socket buffer still "
        "drain through the shaper after that). *Over direct* is the slowest peer's time minus the direct pull's: "
        "what the P2P path adds to the link's own time. CPU seconds are per role, summed over that role's "
        f"processes, during the round ({doc['machine']['cpus']} CPUs: {doc['machine']['cpus']} CPU-seconds per "
        "second is the whole machine).",
        "",
        "| N | origin done (s) | slowest peer (s) | over direct (s) | first byte, median (s) | machine CPU busy "
        "| CPU seconds by role (top 4) |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in doc["rounds"]:
        d = entry["damselfly"]
        done = d["origin"]["last_blob_byte_seconds"]
        slowest = d["completion_seconds"]["max"]
        first = d["first_byte_seconds"]["median"] if d["first_byte_seconds"] else float("nan")
        lines.append(
            f"| {entry['peers']} | {f'{done:.1f}' if done is not None else '?'} | {slowest:.1f} "
            f"| {slowest - direct_s:+.1f} | {first:.2f} | {d['cpu']['machine_busy_percent']:.0f}% "
            f"| {_top_roles(d['cpu'])} |"
        )
    return [*lines, ""]


def warm_lines(doc: dict[str, Any]) -> list[str]:
    """Warm serving against nginx."""
    warm = doc["warm"]
    lines = [
        "## Warm serving: a cached blob to curl",
        "",
        f"{_mib(warm['blob']['size'])} already in peer-0's piece store; `curl -s -o /dev/null` of the whole blob "
        "through peer-0's registry-proxy, and from nginx (`sendfile on`, one worker) serving the store's own "
        f"data file (`{warm['data_file']}`), so both read the same page cache. Unshaped; "
        f"{doc['settings']['warm_runs']} runs each, alternating (the first of each pair swaps), after one "
        "untimed fetch each.",
        "",
        "| server | runs (s) | median (s) | GB/s | ÷ nginx |",
        "|---|---|---|---|---|",
    ]
    for server in ("damselfly", "nginx"):
        runs = ", ".join(f"{r['seconds']:.3f}" for r in warm["runs"] if r["server"] == server)
        ratio = warm["ratio_vs_nginx"] if server == "damselfly" else 1.0
        lines.append(
            f"| {server} | {runs} | {warm['median_seconds'][server]:.3f} | {warm['gb_per_second'][server]:.2f} "
            f"| **{ratio:.3f}x** |"
        )
    proxy_cpu = _median([r["proxy_cpu_seconds"] for r in warm["runs"] if "proxy_cpu_seconds" in r])
    curl_cpu = {
        server: _median(
            [r["client_cpu_seconds"] for r in warm["runs"] if r["server"] == server and "client_cpu_seconds" in r]
        )
        for server in ("damselfly", "nginx")
    }
    if proxy_cpu is not None and curl_cpu["nginx"] is not None and curl_cpu["damselfly"] is not None:
        lines += [
            "",
            f"CPU per fetch (median): the proxy process {proxy_cpu:.2f} s for a "
            f"{warm['median_seconds']['damselfly']:.2f} s fetch; curl {curl_cpu['damselfly']:.2f} s against the proxy "
            f"and {curl_cpu['nginx']:.2f} s against nginx "
            f"(a {warm['median_seconds']['nginx']:.2f} s fetch): when curl's CPU time is close to nginx's fetch time, "
            "the client, not nginx, sets the ceiling.",
        ]
    fill = warm["fill"]
    lines += [
        "",
        f"Filling the cache (one cold, unshaped pull through peer-0): {fill['completion_seconds']['max']:.1f} s, "
        f"origin bytes {fill['origin']['bytes_ratio']:.3f}x.",
        "",
    ]
    profile = warm.get("profile")
    if profile and "top_own_frames" in profile:
        lines += [
            "Proxy profile (py-spy, running threads only, own time) during one more fetch of "
            f"{profile['run']['seconds']:.2f} s: {profile['samples']} samples "
            f"(one always-busy thread would give {profile['samples_if_always_busy']}).",
            "",
            "| share | frame |",
            "|---|---|",
        ]
        lines += [f"| {f['share']:.1%} | `{f['frame']}` |" for f in profile["top_own_frames"]]
        lines.append("")
    return lines


def notes_lines(doc: dict[str, Any]) -> list[str]:
    """What the numbers mean: every missed goal by how much and where its time went, and the comparison."""
    lines = ["## Missed goals and where the time goes", ""]
    rounds = {entry["peers"]: entry for entry in doc["rounds"]}
    missed = [goal for goal in doc["goals"] if not goal["met"]]
    if not missed:
        lines += ["Every goal was met in this run.", ""]
    for goal in missed:
        if goal["goal"].startswith("origin bytes"):
            n = int(goal["goal"].rsplit("=", 1)[1])
            d = rounds[n]["damselfly"]
            size = rounds[n]["blob"]["size"]
            failed = [f"{p['client']} ({p['status']}, {p['error']})" for p in d["pulls"] if not p["sha256_ok"]]
            lines.append(
                f"- **Origin bytes at N={n}: {goal['value']:.3f}x** against 1.00x: the origin sent "
                f"{d['origin']['bytes'] - size:+,} bytes more than the blob in {d['origin']['blob_gets']} blob GETs "
                f"(statuses {d['origin']['blob_get_statuses']})"
                + (f"; failed pulls: {', '.join(failed)}" if failed else "")
                + ". Every byte past 1.00x is a piece fetched twice from the origin (a seed retry) or a peer "
                "going back to the source."
            )
        elif goal["goal"].startswith("slowest peer"):
            n = int(goal["goal"].split("N=")[1].split(" ")[0])
            d, base = rounds[n]["damselfly"], rounds[min(rounds)]["damselfly"]
            slowest, base_s = d["completion_seconds"]["max"], base["completion_seconds"]["max"]
            direct = doc["direct"]["completion_seconds"]["max"]
            done = d["origin"]["last_blob_byte_seconds"]
            cpu = d["cpu"]
            lines.append(
                f"- **Completion at N={n}: {goal['value']:.3f}x of N=1** against at most 1.30x: the slowest peer "
                f"took {slowest:.1f} s, {slowest - 1.3 * base_s:.1f} s more than 1.3 x {base_s:.1f} s "
                f"({(goal['value'] / 1.3 - 1) * 100:.0f}% over the goal). The link alone takes {direct:.1f} s "
                f"(direct pull); the origin handed over its last byte at "
                f"{f'{done:.1f} s' if done is not None else 'an unknown time'}, so "
                f"{slowest - (done if done is not None else direct):.1f} s went to the P2P fan-out after the seed "
                f"had everything. The machine's CPUs were {cpu['machine_busy_percent']:.0f}% busy during the round; "
                f"CPU seconds by role: {_top_roles(cpu, 6)} (over {cpu['wall_seconds']:.1f} s of wall time)."
            )
        elif goal["goal"].startswith("warm"):
            warm = doc["warm"]
            proxy_cpu = _median([r["proxy_cpu_seconds"] for r in warm["runs"] if "proxy_cpu_seconds" in r])
            busy = f"{proxy_cpu / warm['median_seconds']['damselfly']:.0%}" if proxy_cpu is not None else "?"
            lines.append(
                f"- **Warm serving: {goal['value']:.3f}x of nginx** against at least 0.80x "
                f"({(1 - goal['value'] / 0.8) * 100:.0f}% short): {warm['gb_per_second']['damselfly']:.2f} GB/s "
                f"against {warm['gb_per_second']['nginx']:.2f} GB/s. The proxy process was busy {busy} of a core "
                "for the whole fetch: every byte is read into Python (1 MiB `pread` per worker-thread hop) and "
                "written by uvicorn, where nginx hands the file to the socket with `sendfile`."
            )
            profile = warm.get("profile")
            if profile and profile.get("top_own_frames"):
                top = ", ".join(f"`{f['frame']}` {f['share']:.0%}" for f in profile["top_own_frames"][:5])
                lines.append(f"  Top frames by own time (py-spy): {top}.")
    if missed:
        lines.append("")
    pt = [(n, rounds[n]["pull_through"]) for n in sorted(rounds)]
    stored = ", ".join(
        f"N={n}: {p['settle']['seconds_after_start']:.0f} s" if p.get("settle", {}).get("blob_stored") else f"N={n}: no"
        for n, p in pt
    )
    lines += [
        "The pull-through cache is no P2P system and is not meant to be one; it is the usual alternative. Its "
        "origin bytes ("
        + ", ".join(f"N={n}: {p['origin']['bytes_ratio']:.2f}x in {p['origin']['blob_gets']} blob GETs" for n, p in pt)
        + ") follow from docker-registry 2.8's proxy blob store: the first request streams the blob from the "
        "origin to its client and starts a second origin fetch that stores it; every request that arrives while "
        "that fetch is under way is streamed from the origin on its own. So the origin sends the blob N+1 times "
        "and the N+1 streams share the shaped link, which is why each client's time grows with N. Blob in the "
        f"cache's storage after: {stored}.",
        "",
    ]
    return lines


def write_markdown(doc: dict[str, Any], out: Path) -> None:
    """p2p.md: the machine and settings, the goals, the tables and the notes."""
    lines = ["# P2P distribution benchmark", "", *machine_lines(doc), *goals_lines(doc)]
    lines += origin_lines(doc) + completion_lines(doc) + warm_lines(doc) + notes_lines(doc)
    lines += [
        "Charts: `p2p_origin_bytes.png` (origin bytes ÷ blob size per N) and `p2p_completion.png` (every "
        "client's completion time per N). Every run's numbers are in `p2p.json`.",
        "",
    ]
    (out / "p2p.md").write_text("\n".join(lines))


def write_charts(doc: dict[str, Any], out: Path) -> None:
    """p2p_origin_bytes.png and p2p_completion.png."""
    rounds = doc["rounds"]
    ns = [entry["peers"] for entry in rounds]
    positions = list(range(len(ns)))
    colours = {"damselfly": "tab:blue", "pull_through": "tab:orange"}

    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.38
    for offset, system in ((-width / 2, "damselfly"), (width / 2, "pull_through")):
        values = [entry[system]["origin"]["bytes_ratio"] for entry in rounds]
        xs = [p + offset for p in positions]
        bars = ax.bar(xs, values, width, label=SYSTEM_LABELS[system], color=colours[system])
        ax.bar_label(bars, labels=[f"{v:.2f}x" for v in values], fontsize=8)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="goal: 1.00x (each byte once)")
    ax.set_xticks(positions, [f"N={n}" for n in ns])
    ax.set_ylabel("origin bytes ÷ blob size")
    ax.set_title(f"Origin load, {_mib(doc['settings']['size_bytes'])} blob pulled by N clients at once")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "p2p_origin_bytes.png", dpi=120)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system, marker, shift in (("damselfly", "o", -0.1), ("pull_through", "s", 0.1)):
        xs, ys = [], []
        for position, entry in zip(positions, rounds, strict=True):
            for pull in entry[system]["pulls"]:
                xs.append(position + shift)
                ys.append(pull["seconds"])
        right.scatter(xs, ys, marker=marker, color=colours[system], label=SYSTEM_LABELS[system], alpha=0.8, s=22)
        ratios = [entry[system]["completion_vs_n1"]["max"] for entry in rounds]
        left.plot(positions, ratios, marker=marker, color=colours[system], label=SYSTEM_LABELS[system])
    direct = doc["direct"]["completion_seconds"]["max"]
    right.axhline(direct, color="grey", linestyle="--", linewidth=1, label=f"direct from origin ({direct:.1f} s)")
    right.set_yscale("log")
    # Plain seconds on the log axis (the default labels read "2x10^1").
    right.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    right.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    right.yaxis.set_minor_formatter(ticker.NullFormatter())
    right.set_ylabel("completion time per client (s, log)")
    right.set_title("Every client's completion time")
    left.axhline(GOAL_COMPLETION_RATIO, color="red", linestyle=":", label="goal: N=8 within 1.3x of N=1")
    left.axhline(1.0, color="black", linewidth=0.5)
    left.set_ylabel("slowest client ÷ N=1")
    left.set_title("Slowest client against one client alone")
    for axis in (left, right):
        axis.set_xticks(positions, [f"N={n}" for n in ns])
        axis.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "p2p_completion.png", dpi=120)
    plt.close(fig)
