"""``python -m services.chunk_fuse --config FILE``."""

from services.chunk_fuse.app import create_app
from services.chunk_fuse.config import ChunkFuseConfig
from shared.runner import run_service

raise SystemExit(run_service(ChunkFuseConfig, create_app))
