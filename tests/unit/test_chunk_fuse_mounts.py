"""The agent's digest lookup for learned lists: a mount's own digest is trusted briefly, then asked again."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from services.chunk_fuse.config import ChunkFuseConfig
from services.chunk_fuse.mounts import DIGEST_TRUST_SECONDS, MountManager, _digest_key

DIGEST = "sha256:" + "cd" * 32
# Nothing listens on port 1: resolving through this registry fails, so a digest can only come from memory.
IMAGE = "127.0.0.1:1/library/python:3.11"


@pytest.fixture
def manager(tmp_path: Path) -> MountManager:
    config = ChunkFuseConfig.model_validate({"workdir": str(tmp_path), "run_dir": str(tmp_path / "run")})
    return MountManager(config, bus=None)


async def test_the_digest_a_mount_found_is_used_without_asking_the_registry(manager: MountManager) -> None:
    config = manager.mount_config({"backend": {"mirrors": [], "retry_limit": 0}})
    assert await manager._resolve_digest(IMAGE, config) is None  # Unreachable, nothing remembered.

    manager._digests[_digest_key(IMAGE, config)] = (DIGEST, time.monotonic())
    assert await manager._resolve_digest(IMAGE, config) == DIGEST

    # Another backend (a mirror) is another way to resolve the reference: not the same entry.
    other = manager.mount_config({"backend": {"mirrors": [{"host": "http://127.0.0.1:2"}], "retry_limit": 0}})
    assert await manager._resolve_digest(IMAGE, other) is None

    # Past the window the registry is asked again (and fails here).
    manager._digests[_digest_key(IMAGE, config)] = (DIGEST, time.monotonic() - DIGEST_TRUST_SECONDS - 1)
    assert await manager._resolve_digest(IMAGE, config) is None
