"""``python -m services.seed_fetcher --config FILE``."""

from services.seed_fetcher.app import create_app
from services.seed_fetcher.config import SeedFetcherConfig
from shared.runner import run_service

raise SystemExit(run_service(SeedFetcherConfig, create_app))
