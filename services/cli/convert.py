"""``damselfly convert | check | inspect``: lazy-format images, with flags like ``nydusify`` and ``nydus-image``."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import aiohttp
import orjson
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from shared.errors import DamselflyError, Unauthorized
from shared.image_format import ConversionOptions, ImageFormatError
from shared.oci import (
    CheckReport,
    ConvertReport,
    ConvertSettings,
    InspectReport,
    Platform,
    check_image,
    convert_image,
    inspect_image,
    open_store,
    parse_reference,
)
from shared.oci.progress import NullProgress, ProgressTask
from shared.oci.progress import Progress as ProgressSink

T = TypeVar("T")
err = Console(stderr=True)

CONVERT_EPILOG = (
    "Examples:\n\n"
    "  damselfly convert --source 127.0.0.1:5000/library/python:3.11 "
    "--target 127.0.0.1:5000/library/python:3.11-lazy --source-insecure --target-insecure\n\n"
    "  damselfly convert --source oci:/images/python:3.11 --target oci:/images/lazy:3.11 --chunk-size 0x10000\n\n"
    "  damselfly convert --source registry.example.com/app:v2 --source-creds bob:secret "
    "--target registry.example.com/app:v2-lazy --target-creds bob:secret --platform linux/arm64 "
    "--prefetch-files prefetch.txt --output-json"
)
CHECK_EPILOG = (
    "Examples:\n\n"
    "  damselfly check --source 127.0.0.1:5000/library/python:3.11 "
    "--target 127.0.0.1:5000/library/python:3.11-lazy --source-insecure --target-insecure\n\n"
    "  damselfly check --source oci:/images/python:3.11 --target oci:/images/lazy:3.11 --output-json"
)
INSPECT_EPILOG = (
    "Examples:\n\n"
    "  damselfly inspect 127.0.0.1:5000/library/python:3.11-lazy --insecure\n\n"
    "  damselfly inspect oci:/images/lazy:3.11 --output-json"
)

# -- shared options ---------------------------------------------------------------------------------

SourceOpt = Annotated[
    str, typer.Option("--source", help="Source image: HOST[:PORT]/REPO[:TAG|@DIGEST] or oci:DIR[:TAG].")
]
TargetOpt = Annotated[str, typer.Option("--target", help="Target image: HOST[:PORT]/REPO[:TAG] or oci:DIR[:TAG].")]
SourceInsecureOpt = Annotated[
    bool, typer.Option("--source-insecure", help="Source registry: plain HTTP, or HTTPS without verification.")
]
TargetInsecureOpt = Annotated[
    bool, typer.Option("--target-insecure", help="Target registry: plain HTTP, or HTTPS without verification.")
]
SourceCredsOpt = Annotated[
    str | None,
    typer.Option(
        "--source-creds",
        envvar="DAMSELFLY_SOURCE_CREDS",
        help="USER:PASS for the source registry (default: ~/.docker/config.json auths).",
        show_default=False,
    ),
]
TargetCredsOpt = Annotated[
    str | None,
    typer.Option(
        "--target-creds",
        envvar="DAMSELFLY_TARGET_CREDS",
        help="USER:PASS for the target registry (default: ~/.docker/config.json auths).",
        show_default=False,
    ),
]
PlatformOpt = Annotated[
    str, typer.Option("--platform", help="OS/ARCH\\[/VARIANT] to pick from a manifest list or index.")
]
OutputJsonOpt = Annotated[bool, typer.Option("--output-json", help="Print the result as JSON on stdout.")]
WorkDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--work-dir", help="Where to make the temporary work directory (removed afterwards).", show_default=False
    ),
]


# -- progress bars ----------------------------------------------------------------------------------


class _AmountColumn(ProgressColumn):
    """Bytes as sizes, items as ``done/total``."""

    def __init__(self) -> None:
        super().__init__()
        self._bytes = DownloadColumn()

    def render(self, task: Task) -> Text:
        if task.fields.get("unit") == "items":
            total = "?" if task.total is None else f"{int(task.total):,}"
            return Text(f"{int(task.completed):,}/{total}", style="progress.download")
        return self._bytes.render(task)


class _SpeedColumn(ProgressColumn):
    def __init__(self) -> None:
        super().__init__()
        self._speed = TransferSpeedColumn()

    def render(self, task: Task) -> Text:
        return Text("") if task.fields.get("unit") == "items" else self._speed.render(task)


class _RichTask:
    def __init__(self, progress: Progress, task_id: TaskID) -> None:
        self._progress = progress
        self._id = task_id

    def advance(self, amount: int) -> None:
        self._progress.advance(self._id, amount)

    def reset(self) -> None:
        self._progress.reset(self._id)

    def done(self) -> None:
        self._progress.remove_task(self._id)


class _RichProgress:
    """The library's progress protocol drawn as rich bars on stderr."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress

    def task(self, description: str, total: int | None, *, unit: str = "bytes") -> ProgressTask:
        return _RichTask(self._progress, self._progress.add_task(description, total=total, unit=unit))


@contextmanager
def _progress(enabled: bool) -> Iterator[ProgressSink]:
    if not enabled:
        yield NullProgress()
        return
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        _AmountColumn(),
        _SpeedColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=True) as progress:
        yield _RichProgress(progress)


# -- running and errors -----------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    """One line for an expected failure."""
    if isinstance(exc, DamselflyError):
        text = exc.message
    elif isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    if isinstance(exc, Unauthorized):
        text += (
            "; give USER:PASS with --source-creds / --target-creds (--creds for inspect) or in ~/.docker/config.json"
        )
    notes = getattr(exc, "__notes__", None)
    if notes:
        text += f" ({'; '.join(notes)})"
    return " ".join(text.split())


def _run(work: Callable[[aiohttp.ClientSession], Awaitable[T]], *, error_code: int = 1) -> T:
    """Run one command's coroutine with an HTTP session; expected failures become one line and an exit code."""

    async def main() -> T:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        headers = {"User-Agent": "damselfly-convert/0.1"}
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
            return await work(session)

    try:
        return asyncio.run(main())
    except (DamselflyError, ImageFormatError, OSError, aiohttp.ClientError) as exc:
        # rich markup in a message (e.g. "[...]" in an entry name) must print literally.
        err.print(Text.assemble(("error: ", "bold red"), _describe(exc)), soft_wrap=True)
        raise typer.Exit(error_code) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _show_progress(output_json: bool) -> bool:
    return not output_json and err.is_terminal


def _platform(text: str) -> Platform:
    try:
        return Platform.parse(text)
    except DamselflyError as exc:
        raise typer.BadParameter(exc.message, param_hint="--platform") from None


def parse_size(text: str) -> int:
    """``1048576``, ``0x100000``, ``1MiB``, ``1M``, ``64KiB`` or ``64K`` as a number of bytes."""
    m = re.fullmatch(r"\s*(0x[0-9a-fA-F]+|\d+)\s*([KkMm]i?[Bb]?)?\s*", text)
    if m is None:
        raise typer.BadParameter(f"{text!r} is not a size (e.g. 1048576, 0x100000, 1MiB)")
    value = int(m.group(1), 0)
    unit = (m.group(2) or "").lower()[:1]
    return value << {"": 0, "k": 10, "m": 20}[unit]


def read_prefetch_list(source: str | None) -> list[str]:
    """Paths to prefetch, one per line (blank lines and ``#`` comments skipped); ``-`` reads stdin."""
    if not source:
        return []
    if source == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(source).read_text()
        except OSError as exc:
            raise typer.BadParameter(_describe(exc), param_hint="--prefetch-files") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _print_json(doc: dict[str, Any]) -> None:
    typer.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


# -- convert ----------------------------------------------------------------------------------------


def convert(
    source: SourceOpt,
    target: TargetOpt,
    source_insecure: SourceInsecureOpt = False,
    target_insecure: TargetInsecureOpt = False,
    source_creds: SourceCredsOpt = None,
    target_creds: TargetCredsOpt = None,
    platform: PlatformOpt = "linux/amd64",
    chunk_size: Annotated[
        str, typer.Option("--chunk-size", help="Chunk size: a power of two from 4KiB to 16MiB (0x100000, 1MiB).")
    ] = "1MiB",
    compressor: Annotated[str, typer.Option("--compressor", help="Chunk compression: zstd, lz4 or none.")] = "zstd",
    digester: Annotated[str, typer.Option("--digester", help="Chunk digest: blake3 or sha256.")] = "blake3",
    prefetch_files: Annotated[
        str | None,
        typer.Option(
            "--prefetch-files",
            help="File listing paths to prefetch, one per line ('-' for stdin); a directory means all below it.",
            show_default=False,
        ),
    ] = None,
    work_dir: WorkDirOpt = None,
    output_json: OutputJsonOpt = False,
) -> None:
    """Convert an OCI image into a lazy-loading Damselfly image (bootstrap + chunked blobs) and push it."""
    options = ConversionOptions(
        chunk_size=parse_size(chunk_size),
        compressor=compressor,
        digester=digester,
        prefetch_files=tuple(read_prefetch_list(prefetch_files)),
    )
    try:
        options.validate()
    except ImageFormatError as exc:
        raise typer.BadParameter(str(exc)) from None
    settings = ConvertSettings(platform=_platform(platform), options=options, work_parent=work_dir)

    async def work(session: aiohttp.ClientSession) -> ConvertReport:
        src = open_store(parse_reference(source), session, insecure=source_insecure, creds=source_creds)
        dst = open_store(parse_reference(target), session, insecure=target_insecure, creds=target_creds)
        with _progress(_show_progress(output_json)) as progress:
            return await convert_image(src, dst, settings, progress)

    report = _run(work)
    if output_json:
        _print_json(report.to_json())
        return
    s = report.stats
    blobs = [b for b in report.blobs if b["media_type"].endswith("blob.v1")]
    typer.echo(f"converted {report.source} -> {report.target}")
    typer.echo(f"  manifest   {report.target_digest} (source {report.source_digest})")
    typer.echo(
        f"  source     {len(report.source_layers)} layers, {_mb(s['source_compressed_bytes'])} compressed, "
        f"{_mb(s['tar_bytes'])} of tar"
    )
    typer.echo(
        f"  target     {len(blobs)} data blob(s) {_mb(s['blob_bytes'])} + bootstrap {_mb(report.bootstrap['size'])}"
        f" ({report.uploaded_blobs} blob(s) uploaded)"
    )
    typer.echo(
        f"  files      {s['files']:,} files, {s['chunks']:,} chunks, {s['unique_chunks']:,} unique, "
        f"dedup ratio {s['dedup_ratio']:.3f}"
    )
    t = report.seconds
    typer.echo(
        f"  time       pull {t['pull']:.2f}s, convert {t['convert']:.2f}s ({s['conversion_mb_s']} MB/s), "
        f"push {t['push']:.2f}s"
    )
    if s["prefetch_missing"]:
        typer.echo(f"  warning    prefetch paths not in the image: {', '.join(s['prefetch_missing'])}")


# -- check ------------------------------------------------------------------------------------------

#: Differences printed before "... and N more" (--output-json lists them all).
MAX_PRINTED_DIFFERENCES = 100


def check(
    source: SourceOpt,
    target: TargetOpt,
    source_insecure: SourceInsecureOpt = False,
    target_insecure: TargetInsecureOpt = False,
    source_creds: SourceCredsOpt = None,
    target_creds: TargetCredsOpt = None,
    platform: PlatformOpt = "linux/amd64",
    work_dir: WorkDirOpt = None,
    output_json: OutputJsonOpt = False,
) -> None:
    """Prove a converted image equals its source: every path, attribute, xattr and byte (exit 1 if not, 2 on error)."""
    plat = _platform(platform)

    async def work(session: aiohttp.ClientSession) -> CheckReport:
        src = open_store(parse_reference(source), session, insecure=source_insecure, creds=source_creds)
        dst = open_store(parse_reference(target), session, insecure=target_insecure, creds=target_creds)
        with _progress(_show_progress(output_json)) as progress:
            return await check_image(src, dst, plat, work_parent=work_dir, progress=progress)

    report = _run(work, error_code=2)
    if output_json:
        _print_json(report.to_json())
    elif report.ok:
        typer.echo(
            f"OK: {report.target} is equivalent to {report.source}: {report.paths:,} paths, "
            f"{report.files:,} files, {_mb(report.file_bytes)} read back and compared"
        )
    else:
        for problem in report.problems:
            typer.echo(f"problem: {problem}")
        for diff in report.differences[:MAX_PRINTED_DIFFERENCES]:
            typer.echo(f"differs: {diff}")
        if len(report.differences) > MAX_PRINTED_DIFFERENCES:
            typer.echo(f"... and {len(report.differences) - MAX_PRINTED_DIFFERENCES} more differences")
        typer.echo(
            f"FAILED: {report.target} differs from {report.source}: {len(report.problems)} problem(s), "
            f"{len(report.differences)} difference(s)"
        )
    if not report.ok:
        raise typer.Exit(1)


# -- inspect ----------------------------------------------------------------------------------------


def inspect(
    reference: Annotated[
        str, typer.Argument(help="A converted image: HOST[:PORT]/REPO[:TAG|@DIGEST] or oci:DIR[:TAG].")
    ],
    insecure: Annotated[bool, typer.Option("--insecure", help="Plain HTTP, or HTTPS without verification.")] = False,
    creds: Annotated[
        str | None,
        typer.Option("--creds", envvar="DAMSELFLY_CREDS", help="USER:PASS for the registry.", show_default=False),
    ] = None,
    platform: PlatformOpt = "linux/amd64",
    output_json: OutputJsonOpt = False,
) -> None:
    """Show a converted image's files, chunks, dedup ratio, blobs and prefetch table (reads only its bootstrap)."""
    plat = _platform(platform)

    async def work(session: aiohttp.ClientSession) -> InspectReport:
        store = open_store(parse_reference(reference), session, insecure=insecure, creds=creds)
        return await inspect_image(store, plat)

    report = _run(work)
    if output_json:
        _print_json(report.to_json())
        return
    out = Console()
    summary = Table(title=f"{report.reference}", show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")
    rows = [
        ("manifest", report.manifest_digest),
        ("format", f"{report.format_version}, chunk size {report.chunk_size:,}, digester {report.digester}"),
        ("bootstrap", f"{report.bootstrap['digest']} ({report.bootstrap['size']:,} bytes)"),
        ("command", " ".join(f"{k}={v}" for k, v in report.command.items()) or "-"),
        (
            "tree",
            f"{report.paths:,} paths: {report.files:,} files, {report.directories:,} directories, "
            f"{report.symlinks:,} symlinks, {report.hardlinks:,} extra hard links, {report.other:,} other",
        ),
        ("file bytes", f"{report.file_bytes:,}"),
        (
            "chunks",
            f"{report.chunks:,} chunks, {report.unique_chunks:,} unique, dedup ratio {report.dedup_ratio:.3f}"
            + (f" ({report.unreferenced_chunks:,} stored but unused)" if report.unreferenced_chunks else ""),
        ),
        ("blobs", f"{len(report.blobs)}: {report.compressed_bytes:,} bytes compressed"),
    ]
    for key, value in rows:
        summary.add_row(key, value)
    out.print(summary)
    blobs = Table("blob", "compressed", "uncompressed", "chunks", "compressor", "source layer", title="blobs")
    for b in report.blobs:
        blobs.add_row(
            b["digest"][:19],
            f"{b['compressed_size']:,}",
            f"{b['uncompressed_size']:,}",
            f"{b['chunks']:,}",
            b["compressor"],
            (b["source_layer"] or "")[:19],
        )
    out.print(blobs)
    prefetch = Table("path", "inode", "type", "files", "bytes", title="prefetch table")
    for p in report.prefetch:
        prefetch.add_row(p["path"], str(p["inode"]), p["type"], f"{p['files']:,}", f"{p['bytes']:,}")
    out.print(prefetch if report.prefetch else "prefetch table: empty")
