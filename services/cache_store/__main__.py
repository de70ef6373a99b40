"""``python -m services.cache_store --config FILE``."""

from services.cache_store.app import create_app
from services.cache_store.config import CacheStoreConfig
from shared.runner import run_service

raise SystemExit(run_service(CacheStoreConfig, create_app))
