"""``python -m services.piece_scheduler --config FILE``."""

from services.piece_scheduler.app import create_app
from services.piece_scheduler.config import SchedulerConfig
from shared.runner import run_service

raise SystemExit(run_service(SchedulerConfig, create_app))
