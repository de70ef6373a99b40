"""What a mount daemon is asked to do (its spec) and what it left for others to find (its record).

Every running daemon keeps ``<run_dir>/mounts/<id>.json``: its pid, mount point, image and control socket.
``damselfly umount`` finds a mount by its mount point there, and an agent that restarts finds the mounts
it had started.  The daemon writes the record once the mount is ready and removes it when it exits; a
record whose pid is gone is stale and ignored (and cleaned up by whoever notices).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from pydantic import BaseModel, Field

from services.chunk_fuse.mount_config import MountConfig
from services.chunk_fuse.rundir import new_mount_id, run_dir


class MountSpec(BaseModel):
    """Everything a daemon needs: the image, where to mount it, and how."""

    id: str = Field(default_factory=new_mount_id)
    image: str
    mountpoint: Path
    config: MountConfig = Field(default_factory=lambda: MountConfig.model_validate({}))
    platform: str = "linux/amd64"
    learned_chunks: list[int] | None = Field(
        None, description="Chunks to prefetch first (learned from an earlier cold start); None if none known."
    )
    owner: str = Field("cli", description="Who started it: 'cli' or 'agent:<node>'.")
    run_dir: Path = Field(default_factory=run_dir)

    @property
    def control_socket(self) -> Path:
        """The daemon's HTTP API (stats, trace) on a unix socket."""
        return self.run_dir / "sockets" / f"{self.id}.sock"

    @property
    def record_path(self) -> Path:
        """Where the daemon's record lives while it runs."""
        return record_path(self.run_dir, self.id)


class MountRecord(BaseModel):
    """A running daemon, as its record file says."""

    id: str
    pid: int
    image: str
    digest: str
    mountpoint: Path
    control_socket: Path
    owner: str
    log_path: Path | None = None
    started_at: float
    shared_from: Path | None = Field(
        None, description="A bind of the agent's kept mount at this path (the daemon is that mount's)."
    )

    @property
    def alive(self) -> bool:
        """Whether the daemon process still exists."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def write_record(spec: MountSpec, record: MountRecord) -> None:
    """Write (atomically) the record of a ready mount."""
    write_record_at(spec.record_path, record)


def record_path(directory: Path, mount_id: str) -> Path:
    """Where the record of mount ``mount_id`` lives in the run dir ``directory``."""
    return directory / "mounts" / f"{mount_id}.json"


def write_record_at(path: Path, record: MountRecord) -> None:
    """Write (atomically) a mount record at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(record.model_dump_json())
    os.replace(tmp, path)


def remove_record(spec: MountSpec) -> None:
    """Remove a mount's record (it is gone)."""
    with contextlib.suppress(FileNotFoundError):
        spec.record_path.unlink()


def list_records(directory: Path | None = None, *, alive_only: bool = True) -> list[MountRecord]:
    """The records in the run dir (stale ones, whose daemon died, are deleted unless asked for)."""
    base = (directory or run_dir()) / "mounts"
    out = []
    for path in sorted(base.glob("*.json")):
        try:
            record = MountRecord.model_validate(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
        if alive_only and not record.alive:
            # A daemon killed outright left its record, socket and spec behind.
            for leftover in (path, record.control_socket, base.parent / "specs" / f"{record.id}.json"):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
            continue
        out.append(record)
    return out


def find_record(mountpoint: Path, directory: Path | None = None) -> MountRecord | None:
    """The live record of the mount at ``mountpoint``, if any."""
    target = Path(os.path.realpath(mountpoint))
    for record in list_records(directory):
        if Path(os.path.realpath(record.mountpoint)) == target:
            return record
    return None
