"""The ``damselfly`` command line."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from services.cli import admin as admin_cli
from services.cli import convert as convert_cli
from services.cli import mount as mount_cli
from services.cli import run as run_cli
from services.cli.cluster import LocalCluster, plan_cluster
from services.cli.demo import DEFAULT_IMAGE_LAYOUT, DemoSettings, run_demo
from services.cli.init import init_app
from shared.config import default_workdir
from shared.errors import DamselflyError
from shared.schemas.export import export_schemas

app = typer.Typer(
    name="damselfly",
    help="P2P image distribution and lazy-loading container images, on NATS JetStream.",
    no_args_is_help=True,
    add_completion=False,
)
schemas_app = typer.Typer(help="The bus's event schemas.", no_args_is_help=True)
app.add_typer(schemas_app, name="schemas")
app.add_typer(init_app, name="init")

err = Console(stderr=True)


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  damselfly up --peers 2 --state-file s.json\n\n"
        "  damselfly up --origin http://127.0.0.1:5000 --workdir /tmp/df\n\n"
        "  damselfly up --nats nats://nats.example:4222 --database postgresql+psycopg://u@db/damselfly"
    )
)
def up(
    peers: Annotated[int, typer.Option(min=0, max=64, help="Peer nodes to run (proxy + cache-store + agent).")] = 1,
    origin: Annotated[
        str, typer.Option(help="Default upstream registry (registryMirror.url); added to the allow-list.")
    ] = "https://index.docker.io",
    workdir: Annotated[
        Path | None, typer.Option(help="Directory for all state (default: the user's data dir).")
    ] = None,
    nats: Annotated[str | None, typer.Option(help="Use this NATS server instead of an embedded one.")] = None,
    database: Annotated[
        str | None, typer.Option(help="Scheduler database URL (default: SQLite in the workdir).")
    ] = None,
    state_file: Annotated[
        Path | None, typer.Option(help="Write the endpoints here as JSON once every service is ready.")
    ] = None,
    scheduler_port: Annotated[int | None, typer.Option(help="Scheduler port (default: a free one).")] = None,
    seed_port: Annotated[int | None, typer.Option(help="Seed-fetcher port (default: a free one).")] = None,
    peer_port_base: Annotated[
        int | None, typer.Option(help="Peer i uses BASE+3i (proxy), +1 (upload), +2 (agent); default free ports.")
    ] = None,
    prefetch: Annotated[
        bool, typer.Option(help="After a Range request, peers fetch the rest of the blob (download.prefetch).")
    ] = True,
) -> None:
    """Start a whole local cluster: NATS, scheduler, seed-fetcher and N peers, until Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    plan = plan_cluster(
        workdir or default_workdir() / "cluster",
        peers=peers,
        origin=origin,
        nats_url=nats,
        database_url=database,
        scheduler_port=scheduler_port,
        seed_port=seed_port,
        peer_port_base=peer_port_base,
        prefetch=prefetch,
    )
    cluster = LocalCluster(plan, state_file=state_file.resolve() if state_file else None)
    try:
        asyncio.run(cluster.run())
    except DamselflyError as exc:
        raise _fail(exc.message) from exc


@app.command(epilog="Examples:\n\n  damselfly demo\n\n  damselfly demo --peers 3 --keep-running --workdir /tmp/demo")
def demo(
    peers: Annotated[int, typer.Option(min=1, max=16, help="Peer nodes in the cluster.")] = 2,
    workdir: Annotated[Path | None, typer.Option(help="Directory for the demo (emptied first).")] = None,
    image_layout: Annotated[Path, typer.Option(help="OCI layout of the image to serve.")] = DEFAULT_IMAGE_LAYOUT,
    image_tag: Annotated[str, typer.Option(help="Tag of the image in the layout.")] = "python",
    keep_running: Annotated[bool, typer.Option(help="Keep the cluster up until Ctrl-C.")] = False,
) -> None:
    """Run the main job on embedded defaults: a real origin with the python image and a local cluster."""
    if not (image_layout / "index.json").exists():
        raise _fail(f"no OCI layout at {image_layout} (see ../shared/images/README.md, or pass --image-layout)")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    console = Console()
    settings = DemoSettings(
        workdir=(workdir or default_workdir() / "demo").resolve(),
        peers=peers,
        image_layout=image_layout.resolve(),
        image_tag=image_tag,
        keep_running=keep_running,
    )
    try:
        asyncio.run(run_demo(settings, console))
    except DamselflyError as exc:
        raise _fail(exc.message) from exc
    except KeyboardInterrupt:
        console.print("stopped")


@app.command(
    epilog=(
        "Examples:\n\n  damselfly get https://example.com/big.iso -O big.iso\n\n"
        "  damselfly get http://127.0.0.1:5000/v2/library/python/blobs/sha256:... -O layer --output-json\n\n"
        "  DAMSELFLY_NODE=http://10.0.0.5:65001 damselfly get URL -O FILE"
    )
)
def get(
    url: Annotated[str, typer.Argument(help="The http(s) URL; its origin must be on the allow-list.")],
    output: Annotated[Path, typer.Option("--output", "-O", help="Where to write the file.")],
    node: Annotated[
        str, typer.Option(envvar="DAMSELFLY_NODE", help="The local node's registry-proxy.")
    ] = "http://127.0.0.1:65001",
    header_authorization: Annotated[
        str | None, typer.Option("--authorization", help="Authorization header for the origin.")
    ] = None,
    output_json: Annotated[bool, typer.Option("--output-json", help="Print the result as JSON.")] = False,
) -> None:
    """Download URL through the local node's P2P network into FILE (like dfget)."""
    import dataclasses

    import orjson

    from services.cli.get import download

    try:
        result = asyncio.run(download(url, output, node, not output_json and sys.stderr.isatty(), header_authorization))
    except DamselflyError as exc:
        raise _fail(exc.message) from exc
    if output_json:
        typer.echo(orjson.dumps(dataclasses.asdict(result)).decode())
    else:
        typer.echo(f"{result.output}: {result.bytes} bytes in {result.seconds:.2f}s")


@schemas_app.command(
    "export", epilog="Examples:\n\n  damselfly schemas export shared/schemas/json\n\n  damselfly schemas export /tmp/s"
)
def schemas_export(
    directory: Annotated[Path, typer.Argument(help="Directory to write the JSON Schema files to.")],
) -> None:
    """Write every event's JSON Schema file into DIRECTORY."""
    for path in export_schemas(directory):
        typer.echo(str(path))


# The scheduler's admin API (services/cli/admin.py).
app.command("peers", epilog=admin_cli.PEERS_EPILOG)(admin_cli.peers)
app.command("tasks", epilog=admin_cli.TASKS_EPILOG)(admin_cli.tasks)
app.command("preheat", epilog=admin_cli.PREHEAT_EPILOG)(admin_cli.preheat)

# Lazy-image commands (services/cli/convert.py).
app.command("convert", epilog=convert_cli.CONVERT_EPILOG)(convert_cli.convert)
app.command("check", epilog=convert_cli.CHECK_EPILOG)(convert_cli.check)
app.command("inspect", epilog=convert_cli.INSPECT_EPILOG)(convert_cli.inspect)

# Lazy mounts (services/cli/mount.py, services/cli/run.py).
app.command("mount", epilog=mount_cli.MOUNT_EPILOG)(mount_cli.mount)
app.command("umount", epilog=mount_cli.UMOUNT_EPILOG)(mount_cli.umount)
app.command(
    "run",
    epilog=run_cli.RUN_EPILOG,
    context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True},
)(run_cli.run)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
