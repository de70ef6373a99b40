"""docker-compose.yml, validated statically (no Docker engine here): references, commands, configs."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml

from shared.config import ServiceConfig

REPO = Path(__file__).resolve().parents[2]
SERVICE_CONFIGS = {
    "services.piece_scheduler": "services.piece_scheduler.config:SchedulerConfig",
    "services.seed_fetcher": "services.seed_fetcher.config:SeedFetcherConfig",
    "services.cache_store": "services.cache_store.config:CacheStoreConfig",
    "services.registry_proxy": "services.registry_proxy.config:RegistryProxyConfig",
    "services.chunk_fuse": "services.chunk_fuse.config:ChunkFuseConfig",
}


def compose() -> dict[str, Any]:
    document = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert isinstance(document, dict)
    return document


def config_class(module: str) -> type[ServiceConfig]:
    module_name, class_name = SERVICE_CONFIGS[module].split(":")
    config_cls = getattr(importlib.import_module(module_name), class_name)
    assert issubclass(config_cls, ServiceConfig)
    return config_cls


def test_dependencies_and_volumes_exist() -> None:
    document = compose()
    services, volumes = document["services"], document.get("volumes", {})
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source.startswith(("/", ".")) or source in volumes, f"{name}: unknown volume {source}"


def test_host_ports_are_unique_and_nats_has_a_healthcheck() -> None:
    services = compose()["services"]
    host_ports = [port.split(":")[0] for service in services.values() for port in service.get("ports", [])]
    assert len(host_ports) == len(set(host_ports))
    assert "-js" in services["nats"]["command"] and "healthcheck" in services["nats"]


def test_every_damselfly_container_runs_a_real_service_with_a_valid_environment(monkeypatch: Any) -> None:
    services = compose()["services"]
    seen = set()
    for name, service in services.items():
        if name == "nats":
            continue
        [module] = service["command"]
        assert module in SERVICE_CONFIGS, f"{name} runs unknown {module}"
        seen.add(module)
        assert (REPO / module.replace(".", "/") / "__main__.py").exists()
        config_cls = config_class(module)
        for key, value in service["environment"].items():
            # The environment source ignores unknown variables (several services share one environment),
            # so a typo would pass silently: check every name against the config's fields.
            field_name = key.removeprefix("DAMSELFLY_").lower().split("__")[0]
            assert field_name in config_cls.model_fields, f"{name}: {key} is not a {config_cls.__name__} setting"
            monkeypatch.setenv(key, str(value))
        config = config_cls()  # Fails on any variable the service would reject.
        assert config.nats.url == "nats://nats:4222"
        for key in service["environment"]:
            monkeypatch.delenv(key)
    assert seen == set(SERVICE_CONFIGS)


def test_the_dockerfile_copies_what_the_services_import() -> None:
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    for path in ("pyproject.toml", "uv.lock", "shared", "services"):
        assert f"COPY {path}" in dockerfile or f" {path} " in dockerfile
