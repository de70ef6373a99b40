"""docker-compose.yml, validated statically (no Docker engine here): schema, references, commands, configs.

Every Damselfly container's environment is fed to its service's real config class, so a variable the
service would reject, or silently ignore, fails here rather than in a crash-looping container.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from shared.config import ServiceConfig

REPO = Path(__file__).resolve().parents[2]
COMPOSE_SCHEMA = Path(__file__).parent / "data" / "compose-spec" / "compose-spec.json"
SERVICE_CONFIGS = {
    "services.piece_scheduler": "services.piece_scheduler.config:SchedulerConfig",
    "services.seed_fetcher": "services.seed_fetcher.config:SeedFetcherConfig",
    "services.cache_store": "services.cache_store.config:CacheStoreConfig",
    "services.registry_proxy": "services.registry_proxy.config:RegistryProxyConfig",
    "services.chunk_fuse": "services.chunk_fuse.config:ChunkFuseConfig",
}
# What the third-party containers listen on (Damselfly's own ports come from their configs).
THIRD_PARTY_PORTS = {"nats": {4222, 8222}, "postgres": {5432}, "jaeger": {4317, 4318, 16686, 13133}, "registry": {5000}}
# Variables that are not DAMSELFLY_* settings, and the file that reads each.
OTHER_VARIABLES = {"OTEL_EXPORTER_OTLP_ENDPOINT": "shared/telemetry.py"}
_URL_RE = re.compile(r"[a-z][a-z0-9+.-]*://[^\s\"',\]]+")


def compose() -> dict[str, Any]:
    document = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert isinstance(document, dict)
    return document


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def damselfly_services() -> dict[str, dict[str, Any]]:
    """The containers built from deploy/Dockerfile, by name."""
    return {name: service for name, service in services().items() if "build" in service}


def module_of(service: dict[str, Any]) -> str:
    [module] = service["command"]
    assert isinstance(module, str)
    return module


def config_class(module: str) -> type[ServiceConfig]:
    module_name, class_name = SERVICE_CONFIGS[module].split(":")
    config_cls = getattr(importlib.import_module(module_name), class_name)
    assert issubclass(config_cls, ServiceConfig)
    return config_cls


def dockerfile() -> str:
    return (REPO / "deploy" / "Dockerfile").read_text()


def dockerfile_env() -> dict[str, str]:
    """The ``ENV`` settings of the Dockerfile (``KEY=VALUE`` forms)."""
    found = {}
    for line in dockerfile().splitlines():
        if line.startswith("ENV "):
            for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', line):
                found[key] = value.strip('"')
    return found


def container_ports(service: dict[str, Any]) -> list[int]:
    return [int(str(port).split(":")[-1].split("/")[0]) for port in service.get("ports", [])]


def host_ports(service: dict[str, Any]) -> list[int]:
    return [int(str(port).split(":")[0]) for port in service.get("ports", [])]


@pytest.fixture
def loaded_configs(monkeypatch: pytest.MonkeyPatch) -> dict[str, ServiceConfig]:
    """Each Damselfly container's config, built by its service's config class from the image's and
    the container's environment (compose's winning), exactly as the process would load it."""
    configs = {}
    for name, service in damselfly_services().items():
        with monkeypatch.context() as patch:
            for key in [key for key in os.environ if key.startswith("DAMSELFLY_")]:
                patch.delenv(key)
            for key, value in {**dockerfile_env(), **service["environment"]}.items():
                if key.startswith("DAMSELFLY_"):
                    patch.setenv(key, str(value))
            configs[name] = config_class(module_of(service))()  # Fails on any value the service would reject.
    return configs


def _setting_path_exists(model: type[BaseModel], path: list[str]) -> bool:
    """Whether ``a__b`` names field ``a`` and, inside its model, ``b`` (the env source ignores the rest)."""
    field = model.model_fields.get(path[0])
    if field is None:
        return False
    if len(path) == 1:
        return True
    nested = field.annotation
    return isinstance(nested, type) and issubclass(nested, BaseModel) and _setting_path_exists(nested, path[1:])


def urls_in(value: object) -> Iterator[str]:
    yield from _URL_RE.findall(str(value))


def compose_validator() -> jsonschema.Draft7Validator:
    """The compose-spec schema (draft 7; its ``$schema`` URL lacks the ``#`` jsonschema looks up)."""
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    assert "draft-07" in schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_the_file_is_valid_against_the_compose_specification() -> None:
    errors = [f"{error.json_path}: {error.message}" for error in compose_validator().iter_errors(compose())]
    assert errors == []


def test_the_schema_check_would_catch_a_mistake() -> None:
    broken = compose()
    broken["services"]["nats"]["healthcheck"]["interval"] = 5  # Compose durations are strings.
    broken["services"]["nats"]["port"] = ["4222:4222"]
    messages = [error.message for error in compose_validator().iter_errors(broken)]
    assert any("is not of type 'string'" in message for message in messages)
    assert any("'port'" in message for message in messages)


def test_the_topology_is_the_one_plan_cluster_runs() -> None:
    by_module: dict[str, list[str]] = {}
    for name, service in damselfly_services().items():
        by_module.setdefault(module_of(service), []).append(name)
    assert sorted(by_module["services.piece_scheduler"]) == ["scheduler"]
    assert sorted(by_module["services.seed_fetcher"]) == ["seed-fetcher"]
    assert sorted(by_module["services.cache_store"]) == ["peer-1-cache-store", "peer-2-cache-store", "seed-cache-store"]
    assert sorted(by_module["services.registry_proxy"]) == ["peer-1-registry-proxy", "peer-2-registry-proxy"]
    assert sorted(by_module["services.chunk_fuse"]) == ["peer-1-chunk-fuse", "peer-2-chunk-fuse"]
    assert set(services()) - set(damselfly_services()) == {"nats", "postgres", "jaeger", "registry"}


def test_every_service_has_an_image_and_the_damselfly_ones_build_from_the_dockerfile() -> None:
    images = {name: service["image"] for name, service in services().items()}
    assert images["nats"].startswith("nats:2.")
    assert images["postgres"].startswith("postgres:")
    assert re.fullmatch(r"jaegertracing/jaeger:2\.\d+\.\d+", images["jaeger"])
    assert images["registry"] == "registry:2"
    for name, service in damselfly_services().items():
        build = service["build"]
        assert (REPO / build["context"] / build["dockerfile"]).resolve() == REPO / "deploy" / "Dockerfile", name
        assert service["image"] == "damselfly:dev", name


def test_every_service_has_a_healthcheck_that_probes_what_it_serves(loaded_configs: dict[str, ServiceConfig]) -> None:
    for name, service in services().items():
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD", f"{name}: exec-form healthcheck expected"
        assert isinstance(service["healthcheck"]["interval"], str)
    assert services()["postgres"]["healthcheck"]["test"][1] == "pg_isready"
    assert "js-enabled-only=true" in " ".join(services()["nats"]["healthcheck"]["test"])
    for name, config in loaded_configs.items():
        [url] = urls_in(" ".join(damselfly_services()[name]["healthcheck"]["test"]))
        parts = urlsplit(url.rstrip("')"))
        # /readyz answers 200 only when NATS and the service's own dependencies are up.
        assert (parts.hostname, parts.port, parts.path) == ("127.0.0.1", config.bind_port, "/readyz"), name


def test_depends_on_waits_for_healthy_services_and_has_no_cycle() -> None:
    all_services = services()
    graph: dict[str, set[str]] = {}
    for name, service in all_services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: use the long depends_on form with conditions"
        graph[name] = set(depends_on)
        for dependency, spec in depends_on.items():
            assert dependency in all_services, f"{name} depends on unknown {dependency}"
            assert spec["condition"] in ("service_healthy", "service_started"), name
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in all_services[dependency], f"{name} waits for {dependency}'s health"
    for name in damselfly_services():
        assert all_services[name]["depends_on"]["nats"]["condition"] == "service_healthy", name
    assert all_services["scheduler"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for node in ("peer-1", "peer-2"):
        proxy_needs = all_services[f"{node}-registry-proxy"]["depends_on"]
        assert proxy_needs[f"{node}-cache-store"]["condition"] == "service_healthy"
    # A cycle would leave compose waiting forever: every service must be reachable in a topological order.
    ordered: list[str] = []
    while len(ordered) < len(graph):
        ready = [name for name, needs in graph.items() if name not in ordered and needs <= set(ordered)]
        assert ready, f"depends_on cycle among {sorted(set(graph) - set(ordered))}"
        ordered.extend(sorted(ready))


def test_ports_publish_what_each_service_binds(loaded_configs: dict[str, ServiceConfig]) -> None:
    all_services = services()
    published = [port for service in all_services.values() for port in host_ports(service)]
    assert len(published) == len(set(published)), "two services publish the same host port"
    for name, config in loaded_configs.items():
        for port in container_ports(all_services[name]):
            assert port == config.bind_port, f"{name} publishes {port} but binds {config.bind_port}"
    for name in set(all_services) - set(loaded_configs):
        assert set(container_ports(all_services[name])) <= THIRD_PARTY_PORTS[name], name
    # Both peers listen on the standard ports in their containers; the host can't give both the same.
    assert all_services["peer-1-registry-proxy"]["ports"] == ["65001:65001"]
    assert all_services["peer-1-cache-store"]["ports"] == ["40901:40901"]
    assert container_ports(all_services["peer-2-registry-proxy"]) == [65001]
    assert container_ports(all_services["peer-2-cache-store"]) == [40901]
    assert set(container_ports(all_services["jaeger"])) == {4317, 4318, 16686}


def test_volumes_are_declared_used_and_shared_within_a_node() -> None:
    document = compose()
    declared = set(document.get("volumes", {}))
    used = set()
    for name, service in document["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source in declared, f"{name}: undeclared volume {source}"
            used.add(source)
    assert used == declared, f"declared but unused: {declared - used}"
    # The processes of a node share its piece store, so they must share its volume.
    for node, members in {
        "seed": ("seed-cache-store", "seed-fetcher"),
        "peer-1": ("peer-1-cache-store", "peer-1-registry-proxy", "peer-1-chunk-fuse"),
        "peer-2": ("peer-2-cache-store", "peer-2-registry-proxy", "peer-2-chunk-fuse"),
    }.items():
        assert {tuple(document["services"][member]["volumes"]) for member in members} == {
            (f"{node}-data:/var/lib/damselfly",)
        }


def test_only_the_fuse_agents_are_privileged_and_they_get_dev_fuse() -> None:
    for name, service in services().items():
        is_agent = name in damselfly_services() and module_of(service) == "services.chunk_fuse"
        assert service.get("privileged", False) is is_agent, name
        if is_agent:
            assert "/dev/fuse:/dev/fuse" in service["devices"], name


def test_every_variable_is_a_real_setting_of_the_service_that_gets_it() -> None:
    checked = 0
    for name, service in damselfly_services().items():
        config_cls = config_class(module_of(service))
        for key in {**dockerfile_env(), **service["environment"]}:
            if key.startswith("DAMSELFLY_"):
                # The environment source ignores unknown variables (several services share one
                # environment), so a typo would pass silently: check every name, nested ones too.
                path = key.removeprefix("DAMSELFLY_").lower().split("__")
                assert _setting_path_exists(config_cls, path), f"{name}: {key} is not a {config_cls.__name__} setting"
            elif key in OTHER_VARIABLES:
                assert key in (REPO / OTHER_VARIABLES[key]).read_text(), f"nothing reads {key}"
            else:
                assert key in ("PATH", "UV_PYTHON_DOWNLOADS", "UV_COMPILE_BYTECODE", "UV_LINK_MODE"), (name, key)
            checked += 1
    assert checked > 50


def test_every_container_loads_a_valid_config_wired_to_the_others(loaded_configs: dict[str, ServiceConfig]) -> None:
    from services.cache_store.config import CacheStoreConfig
    from services.chunk_fuse.config import ChunkFuseConfig
    from services.piece_scheduler.config import SchedulerConfig
    from services.registry_proxy.config import RegistryProxyConfig
    from services.seed_fetcher.config import SeedFetcherConfig

    assert {module_of(service) for service in damselfly_services().values()} == set(SERVICE_CONFIGS)
    for name, config in loaded_configs.items():
        assert config.nats.url == "nats://nats:4222", name
        assert config.host == "0.0.0.0", name
        assert str(config.workdir) == "/var/lib/damselfly", name
        assert damselfly_services()[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"

    scheduler = loaded_configs["scheduler"]
    assert isinstance(scheduler, SchedulerConfig)
    postgres = services()["postgres"]["environment"]
    expected_db = (
        f"postgresql+psycopg://{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}"
        f"@postgres:5432/{postgres['POSTGRES_DB']}"
    )
    assert scheduler.effective_database_url == expected_db

    seed_store, seed = loaded_configs["seed-cache-store"], loaded_configs["seed-fetcher"]
    assert isinstance(seed_store, CacheStoreConfig) and isinstance(seed, SeedFetcherConfig)
    assert seed_store.is_seed and seed_store.effective_peer_id == seed.effective_seed_id
    assert seed_store.effective_storage_dir == seed.effective_storage_dir
    assert seed_store.upload_url == "http://seed-cache-store:40901"
    for node in ("peer-1", "peer-2"):
        store, proxy, agent = (
            loaded_configs[f"{node}-{part}"] for part in ("cache-store", "registry-proxy", "chunk-fuse")
        )
        assert isinstance(store, CacheStoreConfig) and isinstance(proxy, RegistryProxyConfig)
        assert isinstance(agent, ChunkFuseConfig)
        assert not store.is_seed
        assert store.effective_peer_id == proxy.effective_peer_id == node
        assert store.effective_storage_dir == proxy.effective_storage_dir
        assert store.effective_database_url == f"sqlite:///{store.effective_storage_dir / 'store.db'}"
        assert store.upload_url == f"http://{node}-cache-store:40901"
        assert proxy.cache_store_url == store.upload_url
        assert store.proxy_url == agent.mirror_url == f"http://{node}-registry-proxy:65001"
        # The bundled registry is the default upstream; what the proxy may reach, the seed may fetch.
        assert proxy.registry_mirror.url == "http://registry:5000"
        assert proxy.allowed_origins == {"http://registry:5000", "https://index.docker.io:443"}
        assert set(seed.allowed_registries) == set(proxy.allowed_registries)


def test_every_url_names_a_service_and_a_port_it_listens_on(loaded_configs: dict[str, ServiceConfig]) -> None:
    all_services = services()
    listening = {name: set(ports) for name, ports in THIRD_PARTY_PORTS.items()}
    listening.update({name: {config.bind_port} for name, config in loaded_configs.items()})
    checked = 0
    for name, service in all_services.items():
        for key, value in service.get("environment", {}).items():
            for url in urls_in(value):
                parts = urlsplit(url)
                if parts.hostname not in all_services:
                    assert parts.hostname == "index.docker.io", f"{name}: {key} names unknown host {parts.hostname}"
                    continue
                assert parts.port in listening[parts.hostname], f"{name}: {key}={url}: nothing listens there"
                checked += 1
    assert checked >= 20


def test_the_dockerfile_can_run_every_command() -> None:
    text = dockerfile()
    for path in ("pyproject.toml", "uv.lock", "shared", "services"):
        assert re.search(rf"^COPY .*\b{path}\b", text, re.MULTILINE), f"the image lacks {path}"
    [entrypoint] = re.findall(r"^ENTRYPOINT (.+)$", text, re.MULTILINE)
    assert json.loads(entrypoint) == ["python", "-m"]
    [cmd] = re.findall(r"^CMD (.+)$", text, re.MULTILINE)
    commands = [json.loads(cmd), *(service["command"] for service in damselfly_services().values())]
    for command in commands:
        module = command[0]  # `python -m <module> [args]`: a package with a __main__.
        assert (REPO / module.replace(".", "/") / "__main__.py").exists(), module
    # The image's Python must satisfy the project's, since uv may not download another one.
    [base] = re.findall(r"^FROM python:(\d+\.\d+)", text, re.MULTILINE)
    assert "UV_PYTHON_DOWNLOADS=never" in text
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"] == f">={base},<3.12"


def test_the_image_installs_the_driver_the_scheduler_database_url_needs() -> None:
    url = services()["scheduler"]["environment"]["DAMSELFLY_DATABASE_URL"]
    driver = url.split("://", 1)[0].split("+", 1)[1]
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    [extra] = [name for name, requirements in extras.items() if any(r.startswith(driver) for r in requirements)]
    assert re.search(rf"^RUN uv sync --frozen --no-dev .*--extra {extra}\b", dockerfile(), re.MULTILINE)
