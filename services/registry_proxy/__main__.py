"""``python -m services.registry_proxy --config FILE``."""

from services.registry_proxy.app import create_app
from services.registry_proxy.config import RegistryProxyConfig
from shared.runner import run_service

raise SystemExit(run_service(RegistryProxyConfig, create_app))
