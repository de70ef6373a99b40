"""Where mounts live on this machine, and whether a path is mounted: standard library only.

``damselfly run`` imports this on its way to starting a container, so it must cost nothing to import.
"""

from __future__ import annotations

import os
from pathlib import Path

RUN_DIR_ENV = "DAMSELFLY_RUN_DIR"


def run_dir() -> Path:
    """Where daemons keep records and sockets: $DAMSELFLY_RUN_DIR, /run/damselfly as root, else a user dir."""
    override = os.environ.get(RUN_DIR_ENV)
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/run/damselfly")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "damselfly"
    import tempfile  # Only here: a container start (this module's importer) should not pay for it.

    return Path(tempfile.gettempdir()) / f"damselfly-{os.getuid()}"


def new_mount_id() -> str:
    """A short random id for a mount."""
    return os.urandom(6).hex()


def is_mounted(path: Path) -> bool:
    """Whether ``path`` is a mount point now (a dead FUSE mount counts too)."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == target:
                return True
    return False


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
