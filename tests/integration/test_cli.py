"""Processes as a user runs them: bad configs fail fast, and `damselfly up` runs and stops a cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.netutil import free_port
from shared.schemas import EVENT_TYPES

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def run_service(module: str, config: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("DAMSELFLY_")}
    return subprocess.run(
        [sys.executable, "-m", module, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


def stderr_problem_lines(stderr: str) -> list[str]:
    """The lines a person reads: everything that is not a routine JSON log line."""
    return [line for line in stderr.splitlines() if line and not line.startswith('{"ts"')]


@pytest.mark.parametrize(
    ("module", "text", "expected"),
    [
        ("services.piece_scheduler", "prot: 80\n", "unknown key 'prot'"),
        ("services.cache_store", "nats:\n  url: [1, 2\n", "not valid YAML"),
        ("services.registry_proxy", "port: eighty\n", "invalid value for 'port'"),
        ("services.chunk_fuse", "telemetry:\n  log_level: LOUD\n", "'telemetry.log_level'"),
    ],
)
def test_bad_config_fails_fast_with_one_line(tmp_path: Path, module: str, text: str, expected: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(text)
    result = run_service(module, config)
    assert result.returncode == 2
    lines = stderr_problem_lines(result.stderr)
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_nats_fails_fast_with_one_line_naming_the_url(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(f"workdir: {tmp_path}\nport: {free_port()}\nnats:\n  url: nats://127.0.0.1:{port}\n")
    started = time.monotonic()
    result = run_service("services.piece_scheduler", config, timeout=90)
    # A few seconds on a quiet machine (three refused connection attempts); generous for a loaded CI.
    assert time.monotonic() - started < 60
    assert result.returncode == 2
    lines = stderr_problem_lines(result.stderr)
    assert len(lines) == 1 and f"cannot connect to NATS at nats://127.0.0.1:{port}" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def processes_mentioning(marker: str) -> list[int]:
    """PIDs whose command line contains ``marker`` (the cluster's workdir: every child names it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split(") ", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict, Path]]:
    workdir = tmp_path / "cluster"
    state_file = tmp_path / "s.json"
    log = (tmp_path / "up.log").open("wb")
    env = {key: value for key, value in os.environ.items() if not key.startswith("DAMSELFLY_")}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "up",
            "--peers",
            "2",
            "--workdir",
            str(workdir),
            "--state-file",
            str(state_file),
            "--origin",
            "http://127.0.0.1:1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env=env,
    )
    try:
        wait_for(lambda: state_file.exists() or process.poll() is not None, 120, "the state file")
        assert process.poll() is None, (tmp_path / "up.log").read_text()
        yield process, orjson.loads(state_file.read_bytes()), workdir
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in processes_mentioning(str(workdir)):
            os.kill(pid, signal.SIGKILL)
        log.close()


def test_up_runs_a_ready_cluster_restarts_dead_children_and_stops_cleanly(
    cluster: tuple[subprocess.Popen[bytes], dict, Path], tmp_path: Path
) -> None:
    process, state, workdir = cluster
    assert state["nats"].startswith("nats://127.0.0.1:")
    assert [peer["name"] for peer in state["peers"]] == ["peer-0", "peer-1"]
    urls = [state["scheduler"], state["seed_fetcher"]]
    for peer in state["peers"]:
        assert set(peer) == {"name", "proxy", "upload", "agent"}
        urls += [peer["proxy"], peer["upload"], peer["agent"]]
    for url in urls:
        status, body = get(f"{url}/readyz")
        assert status == 200, (url, body)
        status, body = get(f"{url}/metrics")
        families = {family.name for family in text_string_to_metric_families(body.decode())}
        assert "damselfly_nats_connected" in families

    # The scheduler sees both peers and the seed, announced over NATS by their cache-stores; its admin API
    # wants the token `up` made and wrote to the state file.
    assert get(f"{state['scheduler']}/api/v1/peers")[0] == 401
    status, body = get(f"{state['scheduler']}/api/v1/peers", token=state["admin_token"])
    assert sorted((p["peer_id"], p["state"], p["is_seed"]) for p in orjson.loads(body)) == [
        ("peer-0", "active", False),
        ("peer-1", "active", False),
        ("seed-0", "active", True),
    ]

    # A child that dies is restarted and logged.
    proxy_port = state["peers"][0]["proxy"].rsplit(":", 1)[1]
    proxy_config = str(workdir / "configs" / "peer-0-registry-proxy.yaml")
    [victim] = processes_mentioning(proxy_config)
    os.kill(victim, signal.SIGKILL)

    def proxy_is_back() -> bool:
        if not any(pid != victim for pid in processes_mentioning(proxy_config)):
            return False
        try:
            return get(f"http://127.0.0.1:{proxy_port}/readyz")[0] == 200
        except OSError:
            return False  # Not listening yet.

    wait_for(proxy_is_back, 60, "the registry-proxy to come back")
    assert "peer-0-registry-proxy exited with code -9; restarting" in (tmp_path / "up.log").read_text()

    # Ctrl-C stops everything: no process of the cluster is left, and the state file is gone.
    children = [pid for pid in processes_mentioning(str(workdir)) if pid != process.pid]
    assert len(children) == 10  # NATS + scheduler + seed (fetcher + cache-store) + 2 x 3 peer services.
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0
    wait_for(lambda: processes_mentioning(str(workdir)) == [], 10, "every child to exit")
    assert not (tmp_path / "s.json").exists()


def test_sigterm_to_the_supervisor_stops_the_cluster(cluster: tuple[subprocess.Popen[bytes], dict, Path]) -> None:
    process, _state, workdir = cluster
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    wait_for(lambda: processes_mentioning(str(workdir)) == [], 10, "every child to exit")


def test_a_killed_supervisor_leaves_no_orphans(cluster: tuple[subprocess.Popen[bytes], dict, Path]) -> None:
    process, _state, workdir = cluster
    process.kill()  # No chance to clean up: the children's parent-death signal must do it.
    process.wait()
    wait_for(lambda: processes_mentioning(str(workdir)) == [], 10, "every child to exit")


def test_schemas_export_writes_one_file_per_event(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "schemas", "export", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    written = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert "piece.announced.v1.json" in written and len(written) == len(EVENT_TYPES)
    schema = orjson.loads((tmp_path / "out" / "piece.announced.v1.json").read_bytes())
    assert schema["x-damselfly-subject"] == "damselfly.v1.piece.announced"
