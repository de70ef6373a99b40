"""Options shared by ``damselfly mount`` and ``damselfly run``, and their one-line failure: typer only."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="Mount config: Damselfly's (YAML/JSON) or a nydusd config.json.", show_default=False),
]
MirrorOpt = Annotated[
    str | None,
    typer.Option(
        "--mirror",
        envvar="DAMSELFLY_MIRROR",
        help="The node's registry-proxy, tried before the registry (default: straight to the registry).",
        show_default=False,
    ),
]
InsecureOpt = Annotated[bool, typer.Option("--insecure", help="The registry speaks plain HTTP or unverified TLS.")]
PlatformOpt = Annotated[str, typer.Option("--platform", help="OS/ARCH\\[/VARIANT] to pick from an index.")]


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one error line and return the Exit to raise."""
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True).print(Text.assemble(("error: ", "bold red"), " ".join(message.split())), soft_wrap=True)
    return typer.Exit(code)
