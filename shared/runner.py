"""The process entry point of every service: ``python -m services.<name> --config FILE``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import uvicorn
from fastapi import FastAPI

from shared.config import ServiceConfig, load_config
from shared.errors import DamselflyError
from shared.logs import configure_logging
from shared.service import StartupErrorReporter

ConfigT = TypeVar("ConfigT", bound=ServiceConfig)

EXIT_STARTUP_FAILED = 2


class _DropUvicornStartupNoise(logging.Filter):
    """uvicorn's own 'startup failed' line repeats what the runner prints; keep the runner's."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Application startup failed")


def run_service(
    config_cls: type[ConfigT],
    create_app: Callable[[ConfigT], FastAPI],
    argv: Sequence[str] | None = None,
) -> int:
    """Load the config, serve the app with uvicorn (uvloop, httptools) until SIGINT/SIGTERM."""
    program = f"damselfly-{config_cls.service.replace('_', '-')}"
    parser = argparse.ArgumentParser(prog=program, description=f"Run the {config_cls.service} service.")
    parser.add_argument("--config", type=Path, help="YAML config file (DAMSELFLY_* variables override it)")
    args = parser.parse_args(argv)
    try:
        config = load_config(config_cls, args.config)
    except DamselflyError as exc:
        print(f"{program}: {exc.message}", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    configure_logging(config.service, config.telemetry.log_level, config.telemetry.json_logs)
    logging.getLogger("uvicorn.error").addFilter(_DropUvicornStartupNoise())
    app = create_app(config)
    server = uvicorn.Server(
        uvicorn.Config(
            StartupErrorReporter(app),
            host=config.host,
            port=config.bind_port,
            loop="uvloop",
            http="httptools",
            lifespan="on",
            log_config=None,
            access_log=config.telemetry.access_log,
            timeout_graceful_shutdown=5,
        )
    )
    # uvicorn exits the process itself when the lifespan fails; the runner reports why, once.
    with contextlib.suppress(SystemExit):
        server.run()  # Not asyncio.run(server.serve()): only run() applies loop="uvloop".
    error = getattr(app.state, "startup_error", None)
    if error is not None:
        print(f"{program}: {error.message}", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    return 0 if server.started else EXIT_STARTUP_FAILED
