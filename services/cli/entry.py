"""The ``damselfly`` command's entry point.

A container start (``damselfly run``) is timed by users like ``docker run``: it loads the run command
alone, not the modules of every other command (the converter, the cluster supervisor, the demo), which
would cost it most of a second of imports. Every other command goes through the full CLI.
"""

from __future__ import annotations

import sys


def main() -> None:
    """Console-script entry point."""
    if sys.argv[1:2] == ["run"]:
        from services.cli.container import main_fast

        code = main_fast(sys.argv[2:])
        if code is not None:
            sys.exit(code)
        from services.cli.run import run_command

        run_command(sys.argv[2:])
        return
    from services.cli.main import main as full_cli

    full_cli()
