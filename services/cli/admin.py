"""``damselfly peers``, ``damselfly tasks``, ``damselfly preheat``: the scheduler's admin API from a shell.

The scheduler and its token come from ``--scheduler``/``--token`` (or ``DAMSELFLY_SCHEDULER`` and
``DAMSELFLY_ADMIN_TOKEN``), else from the state file ``damselfly up --state-file`` wrote.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import aiohttp
import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shared.errors import DamselflyError, DependencyUnavailable, InvalidRequest

DEFAULT_SCHEDULER = "http://127.0.0.1:8002"
TERMINAL_STATES = frozenset({"succeeded", "failed"})

out = Console()
err = Console(stderr=True)

SchedulerOption = Annotated[
    str | None,
    typer.Option(
        envvar="DAMSELFLY_SCHEDULER", help=f"Scheduler URL (default: the state file's, else {DEFAULT_SCHEDULER})."
    ),
]
TokenOption = Annotated[
    str | None, typer.Option(envvar="DAMSELFLY_ADMIN_TOKEN", help="Admin API bearer token (default: the state file's).")
]
StateFileOption = Annotated[
    Path | None,
    typer.Option(envvar="DAMSELFLY_STATE_FILE", help="State file written by `damselfly up --state-file`."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table.")]
PageOption = Annotated[int, typer.Option(min=1, help="Page of the list.")]
PerPageOption = Annotated[int, typer.Option(min=1, max=1000, help="Items per page.")]


class AdminApiError(DamselflyError):
    """The admin API answered with an error (its status and message are shown)."""

    code = "admin_api"


@dataclass(frozen=True)
class Endpoint:
    """Where the admin API is and how to authenticate to it."""

    url: str
    token: str | None

    @classmethod
    def resolve(cls, scheduler: str | None, token: str | None, state_file: Path | None) -> Endpoint:
        """Explicit values first, then the state file, then the default scheduler without a token."""
        state: dict[str, Any] = {}
        if state_file is not None:
            try:
                state = orjson.loads(state_file.read_bytes())
            except (OSError, orjson.JSONDecodeError) as exc:
                raise InvalidRequest(f"cannot read the state file {state_file}: {exc}") from exc
        url = scheduler or state.get("scheduler") or DEFAULT_SCHEDULER
        return cls(url=str(url).rstrip("/"), token=token or state.get("admin_token"))

    def headers(self) -> dict[str, str]:
        """The request headers (the bearer token when there is one)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


async def call(
    endpoint: Endpoint, method: str, path: str, *, params: dict[str, Any] | None = None, body: Any = None
) -> tuple[Any, dict[str, str]]:
    """One request to the admin API: the decoded JSON body and the response headers."""
    url = f"{endpoint.url}/api/v1{path}"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
            session.request(method, url, params=params, json=body, headers=endpoint.headers()) as response,
        ):
            data = await response.read()
            if response.status >= 400:
                try:
                    message = orjson.loads(data).get("message", data.decode(errors="replace"))
                except (orjson.JSONDecodeError, AttributeError):
                    message = data.decode(errors="replace")[:300]
                raise AdminApiError(f"{method} {url}: {response.status} {message}", status=response.status)
            return orjson.loads(data), dict(response.headers)
    except aiohttp.ClientError as exc:
        raise DependencyUnavailable(f"cannot reach the scheduler at {endpoint.url}: {exc}") from exc


def _run(coroutine: Any) -> Any:
    try:
        return asyncio.run(coroutine)
    except DamselflyError as exc:
        err.print(f"[bold red]error:[/] {exc.message}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from exc


def _ago(text: str | None) -> str:
    if not text:
        return "-"
    seconds = (datetime.now(UTC) - datetime.fromisoformat(text)).total_seconds()
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value = value / 1024  # type: ignore[assignment]
    return str(value)


def _total(headers: dict[str, str], shown: int) -> str:
    total = headers.get("X-Total-Count") or headers.get("x-total-count")
    return f"{shown} of {total}" if total else str(shown)


PEERS_EPILOG = (
    "Examples:\n\n  damselfly peers --state-file s.json\n\n  damselfly peers --scheduler http://10.0.0.2:8002 --json"
)


def peers(
    scheduler: SchedulerOption = None,
    token: TokenOption = None,
    state_file: StateFileOption = None,
    as_json: JsonOption = False,
    page: PageOption = 1,
    per_page: PerPageOption = 100,
) -> None:
    """List the peers the scheduler knows: state, location, load, pieces held, last heartbeat."""
    endpoint = Endpoint.resolve(scheduler, token, state_file)
    rows, headers = _run(call(endpoint, "GET", "/peers", params={"page": page, "per_page": per_page}))
    if as_json:
        typer.echo(orjson.dumps(rows).decode())
        return
    table = Table(title=f"peers ({_total(headers, len(rows))})")
    for column in ("peer", "state", "node", "ip", "idc/location", "seed", "slots", "tasks", "pieces", "heartbeat"):
        table.add_column(column)
    for peer in rows:
        slots = f"{peer['upload_slots_in_use']}/{peer['upload_slots'] or '-'}"
        where = "/".join(part for part in (peer["idc"], peer["location"]) if part) or "-"
        table.add_row(
            peer["peer_id"],
            peer["state"],
            peer["node_name"] or "-",
            peer["ip"] or "-",
            where,
            "yes" if peer["is_seed"] else "",
            slots,
            str(peer["tasks_held"]),
            str(peer["pieces_held"]),
            _ago(peer["last_heartbeat_at"]),
        )
    out.print(table)


TASKS_EPILOG = "Examples:\n\n  damselfly tasks --state-file s.json\n\n  damselfly tasks 3f2a...e1 --json"


def tasks(
    task_id: Annotated[str | None, typer.Argument(help="Show this task with its pieces and holders.")] = None,
    scheduler: SchedulerOption = None,
    token: TokenOption = None,
    state_file: StateFileOption = None,
    as_json: JsonOption = False,
    page: PageOption = 1,
    per_page: PerPageOption = 100,
) -> None:
    """List the tasks the scheduler knows, or show one with which peer holds which pieces."""
    endpoint = Endpoint.resolve(scheduler, token, state_file)
    if task_id is not None:
        task, _ = _run(call(endpoint, "GET", f"/tasks/{task_id}"))
        if as_json:
            typer.echo(orjson.dumps(task).decode())
            return
        out.print(
            f"task {task['task_id']}  {task['state']}  {_size(task['content_length'])}  "
            f"{task['pieces_held']}/{task['piece_count']} pieces  back-to-source {task['back_to_source_count']}"
        )
        if task["url"]:
            out.print(f"url {task['url']}", highlight=False)
        table = Table(title="holders")
        table.add_column("peer")
        table.add_column("pieces")
        for peer_id, numbers in sorted(task["peers"].items()):
            table.add_row(peer_id, _ranges(numbers))
        out.print(table)
        return
    rows, headers = _run(call(endpoint, "GET", "/tasks", params={"page": page, "per_page": per_page}))
    if as_json:
        typer.echo(orjson.dumps(rows).decode())
        return
    table = Table(title=f"tasks ({_total(headers, len(rows))})")
    for column in ("task", "state", "size", "pieces", "holders", "back-to-source", "digest"):
        table.add_column(column)
    for task in rows:
        table.add_row(
            task["task_id"][:16],
            task["state"],
            _size(task["content_length"]),
            f"{task['pieces_held']}/{task['piece_count'] if task['piece_count'] is not None else '?'}",
            str(task["holders"]),
            str(task["back_to_source_count"]),
            (task["digest"] or "-")[:19],
        )
    out.print(table)


def _ranges(numbers: list[int]) -> str:
    """``[0, 1, 2, 5]`` → ``0-2, 5``."""
    spans: list[str] = []
    start = previous = None
    for number in numbers:
        if previous is not None and number == previous + 1:
            previous = number
            continue
        if start is not None:
            spans.append(f"{start}-{previous}" if start != previous else str(start))
        start = previous = number
    if start is not None:
        spans.append(f"{start}-{previous}" if start != previous else str(start))
    return ", ".join(spans)


PREHEAT_EPILOG = (
    "Examples:\n\n  damselfly preheat docker.io/library/python:3.11 --platform linux/amd64\n\n"
    "  damselfly preheat 127.0.0.1:5000/team/app@sha256:... --state-file s.json\n\n"
    "  damselfly preheat registry.example/app:1 --username ci --password-stdin < token.txt"
)


def preheat(
    image: Annotated[str, typer.Argument(help="HOST[:PORT]/REPO[:TAG|@DIGEST]; its registry must be allowed.")],
    platform: Annotated[
        str | None, typer.Option(help="os/arch[/variant] of an index (default: every platform it lists).")
    ] = None,
    username: Annotated[str | None, typer.Option(help="Registry user name (with --password-stdin).")] = None,
    password_stdin: Annotated[bool, typer.Option(help="Read the registry password from stdin.")] = False,
    wait: Annotated[bool, typer.Option(help="Follow the job until it ends (exit 1 if it fails).")] = True,
    timeout: Annotated[float, typer.Option(min=1, help="Give up waiting after this many seconds.")] = 3600,
    scheduler: SchedulerOption = None,
    token: TokenOption = None,
    state_file: StateFileOption = None,
    as_json: JsonOption = False,
) -> None:
    """Have the seeds fetch every layer of IMAGE into the cluster before anyone pulls it."""
    endpoint = Endpoint.resolve(scheduler, token, state_file)
    body: dict[str, Any] = {"image": image, "platform": platform}
    if username is not None:
        body["username"] = username
        body["password"] = sys.stdin.readline().rstrip("\n") if password_stdin else ""
    job, _ = _run(call(endpoint, "POST", "/jobs/preheat", body=body))
    if not wait:
        typer.echo(orjson.dumps(job).decode() if as_json else job["job_id"])
        return
    job = _run(_follow(endpoint, job["job_id"], timeout, show=not as_json and err.is_terminal))
    if as_json:
        typer.echo(orjson.dumps(job).decode())
    else:
        summary = f"{job['blobs_available']}/{job['blobs_total']} blobs, {_size(job['bytes_available'])}"
        typer.echo(f"job {job['job_id']} {job['state']}: {job['image']} ({summary})")
    if job["state"] != "succeeded":
        if job.get("error"):
            err.print(f"[bold red]error:[/] {job['error']}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


async def _follow(endpoint: Endpoint, job_id: str, timeout: float, show: bool) -> dict[str, Any]:
    """Poll the job until it ends, with a progress bar of bytes held when on a terminal."""
    deadline = time.monotonic() + timeout
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, disable=not show, transient=True) as progress:
        bar = progress.add_task(f"preheat {job_id[:12]}", total=None)
        while True:
            job, _ = await call(endpoint, "GET", f"/jobs/{job_id}")
            if job["bytes_total"]:
                progress.update(bar, total=job["bytes_total"], completed=job["bytes_available"])
            if job["state"] in TERMINAL_STATES:
                return dict(job)
            if time.monotonic() > deadline:
                raise AdminApiError(f"job {job_id} still {job['state']} after {timeout:.0f}s")
            await asyncio.sleep(0.5)
