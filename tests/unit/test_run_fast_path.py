"""``damselfly run``'s fast path reads ordinary command lines as the full CLI does, and leaves it the rest."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.main import get_command

from services.cli.container import RunArgs, parse_fast
from services.cli.run import run

ORDINARY = [
    ["127.0.0.1:5000/app:lazy"],
    ["127.0.0.1:5000/app:lazy", "--", "python3", "-V"],
    ["127.0.0.1:5000/app:lazy", "python3", "-c", "print(1)"],
    ["--insecure", "--agent", "http://127.0.0.1:9", "127.0.0.1:5000/app:lazy", "--", "sh", "-c", "exit 3"],
    ["--config", "/tmp/c.json", "--mirror", "http://127.0.0.1:65001", "reg.example/app:v1", "--", "ls", "--all"],
    ["--platform", "linux/arm64", "--agent", "http://a:1", "--insecure", "x.example/y@sha256:" + "a" * 64],
    # After IMAGE every word is the command's, options included.
    ["--agent", "http://a:1", "x.example/y:z", "--insecure", "--config", "c"],
]
LEFT_TO_THE_FULL_CLI = [
    [],
    ["--help"],
    ["--agent"],
    ["--agent=http://a:1", "x.example/y:z"],
    ["--bogus", "x.example/y:z"],
    ["-h"],
]


def full_cli(argv: list[str]) -> RunArgs:
    """What the typer command line makes of ``argv``."""
    app = typer.Typer()
    app.command(context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True})(run)
    context = get_command(app).make_context("damselfly run", list(argv))
    params = context.params
    command = list(params["cmd"] or [])
    if command[:1] == ["--"]:
        command = command[1:]
    return RunArgs(
        image=params["image"],
        command=command,
        config=params["config"],
        mirror=params["mirror"],
        insecure=params["insecure"],
        platform=params["platform"],
        agent=params["agent"],
    )


@pytest.mark.parametrize("argv", ORDINARY, ids=" ".join)
def test_the_fast_path_reads_an_ordinary_command_line_as_the_full_cli_does(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DAMSELFLY_MIRROR", raising=False)
    monkeypatch.delenv("DAMSELFLY_AGENT", raising=False)
    assert parse_fast(argv, {}) == full_cli(argv)


def test_environment_variables_count_as_the_full_cli_counts_them(monkeypatch: pytest.MonkeyPatch) -> None:
    environ = {"DAMSELFLY_MIRROR": "http://m:1", "DAMSELFLY_AGENT": "http://a:2"}
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    for argv in (["x.example/y:z"], ["--mirror", "http://other:3", "x.example/y:z", "true"]):
        assert parse_fast(argv, environ) == full_cli(argv)


@pytest.mark.parametrize("argv", LEFT_TO_THE_FULL_CLI, ids=lambda argv: " ".join(argv) or "nothing")
def test_help_typos_and_unusual_spellings_go_to_the_full_cli(argv: list[str]) -> None:
    assert parse_fast(argv, {}) is None


def test_a_config_path_is_a_path() -> None:
    parsed = parse_fast(["--config", "rel/c.yaml", "x.example/y:z"], {})
    assert parsed is not None and parsed.config == Path("rel/c.yaml")


def test_the_fast_path_talks_to_the_agent_without_reading_heavy_modules(tmp_path: Path) -> None:
    """What a container start imports is read from disk when the page cache is cold: no CLI framework, no
    models, no archive codecs, no IDNA tables for a localhost address."""
    import http.server
    import json
    import subprocess
    import sys
    import threading

    class Agent(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"ok": true}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Agent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        script = (
            "import json, sys\n"
            "import services.cli.container\n"
            "from services.cli.agent_client import _http\n"
            f"status, body = _http('http://127.0.0.1:{server.server_address[1]}', 'GET', '/mounts', None, 10)\n"
            "print(json.dumps({'status': status, 'body': body.decode(), 'modules': sorted(sys.modules)}))\n"
        )
        repo = Path(__file__).resolve().parents[2]
        result = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, check=True)
    finally:
        server.shutdown()
    answer = json.loads(result.stdout)
    assert answer["status"] == 200 and json.loads(answer["body"]) == {"ok": True}
    heavy = {"typer", "rich", "pydantic", "click", "shutil", "zlib", "lzma", "encodings.idna", "http.client", "ssl"}
    assert heavy.isdisjoint(answer["modules"]), sorted(heavy.intersection(answer["modules"]))


def test_a_finished_run_leaves_no_state_dir_whether_or_not_something_was_left_in_it(tmp_path: Path) -> None:
    from services.cli.container import make_state_dir, remove_state_dir

    empty, cluttered = tmp_path / "empty", tmp_path / "cluttered"
    make_state_dir(empty)
    make_state_dir(cluttered)
    (cluttered / "rw" / "upper").mkdir()
    (cluttered / "rw" / "upper" / "file").write_text("written outside the run's tmpfs")
    remove_state_dir(empty)
    remove_state_dir(cluttered)
    remove_state_dir(tmp_path / "never-made")  # Nothing to remove: no error.
    assert not empty.exists() and not cluttered.exists()
