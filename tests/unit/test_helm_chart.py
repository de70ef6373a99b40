"""The Helm chart helm/damselfly, checked offline: lint, render, Kubernetes schemas and the services' own configs.

helm_python renders through Helm's Go SDK (no cluster, no network); kubernetes_validate checks every
object against the bundled OpenAPI schemas of one Kubernetes version, strictly (unknown fields fail).
Every rendered config file is loaded with the service's real config class, with the container's
environment resolved as the kubelet would, so the chart cannot drift from the code.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from services.cache_store.config import CacheStoreConfig
from services.chunk_fuse.config import ChunkFuseConfig
from services.piece_scheduler.config import SchedulerConfig
from services.registry_proxy.config import RegistryProxyConfig
from services.seed_fetcher.config import SeedFetcherConfig
from shared.config import ServiceConfig, load_config

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "damselfly"
KUBE_VERSION = "1.33.0"
RELEASE, NAMESPACE = "rel", "ns"
WORKDIR = "/var/lib/damselfly"

# The config class each `python -m <module>` process loads.
SERVICE_CONFIGS: dict[str, type[ServiceConfig]] = {
    "services.piece_scheduler": SchedulerConfig,
    "services.seed_fetcher": SeedFetcherConfig,
    "services.cache_store": CacheStoreConfig,
    "services.registry_proxy": RegistryProxyConfig,
    "services.chunk_fuse": ChunkFuseConfig,
}
# What the chart sets itself in each config block of values.yaml; the schema offers every other field.
COMMON_MANAGED = {"host", "port", "node_name", "workdir"}
MANAGED_KEYS = {
    ("scheduler",): ("services.piece_scheduler", COMMON_MANAGED | {"database_url"}),
    ("seedFetcher",): ("services.seed_fetcher", COMMON_MANAGED | {"seed_id", "storage_dir", "database_url"}),
    ("seedFetcher", "cacheStore"): (
        "services.cache_store",
        COMMON_MANAGED | {"peer_id", "advertise_host", "proxy_url", "is_seed", "storage_dir", "database_url"},
    ),
    ("node", "proxy"): (
        "services.registry_proxy",
        COMMON_MANAGED | {"cache_store_url", "peer_id", "storage_dir", "database_url"},
    ),
    ("node", "cacheStore"): (
        "services.cache_store",
        COMMON_MANAGED | {"peer_id", "advertise_host", "proxy_url", "is_seed", "storage_dir", "database_url"},
    ),
    ("node", "chunkFuse"): (
        "services.chunk_fuse",
        COMMON_MANAGED | {"mirror_url", "fuse_device", "run_dir", "cache_dir"},
    ),
}
# Nested keys the chart manages (the NATS URL) or passes as a Secret (the admin token), not via config.
NESTED_MANAGED = {"nats": {"url"}, "api": {"token"}}
DRAGONFLY_CONFIG_KEYS = {"verbose", "pprofPort"}

# What the kubelet would put in fieldRef variables, for resolving a container's environment.
FIELD_VALUES = {
    "metadata.name": "rel-damselfly-seed-0",
    "spec.nodeName": "worker-1.example.internal",
    "status.podIP": "10.244.1.7",
    "status.hostIP": "192.168.10.21",
}
RECOMMENDED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
)
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}

# A Dragonfly values file that changes every key the chart translates, to see each one arrive.
DRAGONFLY_CHANGED = {
    "scheduler": {"replicas": 1, "config": {"verbose": False}},
    "seedPeer": {
        "replicas": 2,
        "persistence": {"enable": True, "size": "50Gi", "storageClass": "fast"},
        "metrics": {"enable": True, "serviceMonitor": {"enable": True}},
        "config": {"verbose": True, "download": {"prefetch": False}},
    },
    "dfdaemon": {
        "hostNetwork": False,
        "metrics": {"enable": False},
        "config": {
            "download": {"prefetch": False},
            "proxy": {
                "defaultFilter": "X-Amz-Date&Expires",
                "security": {"insecure": True},
                "tcpListen": {"listen": "0.0.0.0", "port": 65005},
                "registryMirror": {"dynamic": False, "url": "https://registry.example.com:5000", "insecure": True},
                "proxies": [{"regx": "blobs/sha256.*"}, {"regx": "manifests/.*", "direct": True}],
            },
        },
    },
}


# Native values that switch on every optional branch of the templates.
EVERYTHING_ON = {
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "externalDatabase": {"url": "postgresql+psycopg://damselfly:secret@postgres:5432/damselfly"},
    "externalNats": {"url": "nats://nats-a:4222,nats://nats-b:4222"},
    "nats": {"enabled": False},
    "imagePullSecrets": [{"name": "registry-credentials"}],
    "commonLabels": {"team": "platform"},
    "scheduler": {
        "replicas": 3,
        "adminToken": {"existingSecret": "damselfly-admin"},
        "config": {"peer_stale_after_seconds": 20, "api": {"open_reads": True}},
    },
    "seedFetcher": {
        "persistence": {"enabled": False},
        "config": {"parallel_ranges": 8},
        "cacheStore": {"config": {"upload_slots": 100}},
    },
    "node": {
        "hostNetwork": False,
        "tolerations": [{"operator": "Exists"}],
        "proxy": {
            "config": {
                "allowed_registries": ["https://ghcr.io"],
                "parallel_pieces": 8,
                "telemetry": {"otlp_endpoint": None, "json_logs": False},  # Nulls and falses survive.
            }
        },
        "cacheStore": {
            "config": {"idc": "eu-1", "upload_rate_limit_bytes": 104857600, "disk_high_watermark_bytes": None}
        },
        "chunkFuse": {"config": {"cache_size_limit": 10737418240}},
    },
}

# The value sets every structural test runs on; "seed" is read from shared/seed at test time.
VALUE_SETS: dict[str, dict[str, Any] | None] = {
    "defaults": {},
    "seed": None,
    "everything-on": EVERYTHING_ON,
    "dragonfly-changed": DRAGONFLY_CHANGED,
}


# -- helpers ---------------------------------------------------------------------------------------


def shared_dir() -> Path:
    """The shared/ folder beside the checkout (DAMSELFLY_SHARED_DIR overrides it), as tests/support does."""
    override = os.environ.get("DAMSELFLY_SHARED_DIR")
    if override:
        return Path(override)
    for candidate in (REPO.parent / "shared", Path("/work/shared")):
        if (candidate / "seed").is_dir():
            return candidate
    return REPO.parent / "shared"


def seed_values() -> dict[str, Any]:
    """The Dragonfly user's values from the seed post."""
    path = shared_dir() / "seed" / "charts-config.yaml"
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict), f"{path} is not a mapping"
    return document


def image_environment() -> dict[str, str]:
    """The DAMSELFLY_* variables deploy/Dockerfile bakes into the image (the chart must override them)."""
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    env: dict[str, str] = {}
    for line in dockerfile.splitlines():
        if line.startswith("ENV "):
            env.update(dict(re.findall(r"(DAMSELFLY_\w+)=(\S+)", line)))
    return env


class Rendered:
    """The objects of one render, looked up by kind and name."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files
        self.notes = next((text for path, text in files.items() if path.endswith("NOTES.txt")), "")
        self.objects: list[dict[str, Any]] = []
        for path, text in sorted(files.items()):
            if path.endswith(".txt"):
                continue
            for document in yaml.safe_load_all(text):
                if document:
                    document["__template"] = path
                    self.objects.append(document)

    def manifests(self) -> Iterator[dict[str, Any]]:
        """Every object without the bookkeeping key."""
        for obj in self.objects:
            yield {key: value for key, value in obj.items() if key != "__template"}

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        """Every object of one kind."""
        return [obj for obj in self.objects if obj["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        """The object of this kind and name (fails listing what there is)."""
        for obj in self.of_kind(kind):
            if obj["metadata"]["name"] == name:
                return obj
        names = [obj["metadata"]["name"] for obj in self.of_kind(kind)]
        raise AssertionError(f"no {kind} {name!r}; rendered: {names}")

    def has(self, kind: str, name: str) -> bool:
        """Whether an object of this kind and name was rendered."""
        return any(obj["metadata"]["name"] == name for obj in self.of_kind(kind))

    def config(self, configmap: str, key: str) -> dict[str, Any]:
        """A config file rendered into a ConfigMap, parsed."""
        document = yaml.safe_load(self.get("ConfigMap", configmap)["data"][key])
        assert isinstance(document, dict)
        return document


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    """One container of a workload's pod template."""
    containers = workload["spec"]["template"]["spec"]["containers"]
    for item in containers:
        if item["name"] == name:
            return item
    raise AssertionError(f"no container {name!r} in {workload['metadata']['name']}: {[c['name'] for c in containers]}")


def resolve_env(spec: dict[str, Any], rendered: Rendered) -> dict[str, str]:
    """A container's environment as the kubelet would build it (fieldRefs faked, Secrets read, $(VAR) expanded)."""
    env: dict[str, str] = {}
    for entry in spec.get("env", []):
        if "value" in entry:
            env[entry["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), entry["value"])
            continue
        source = entry["valueFrom"]
        if "fieldRef" in source:
            env[entry["name"]] = FIELD_VALUES[source["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            if rendered.has("Secret", ref["name"]):
                env[entry["name"]] = rendered.get("Secret", ref["name"])["stringData"][ref["key"]]
            else:  # An existing Secret the user names: any valid value will do.
                env[entry["name"]] = {"DAMSELFLY_DATABASE_URL": "postgresql+psycopg://u:p@db:5432/damselfly"}.get(
                    entry["name"], "secret-token"
                )
        else:
            raise AssertionError(f"unexpected env source {source}")
    return env


def load_container_config(
    workload: dict[str, Any], name: str, rendered: Rendered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> ServiceConfig:
    """Load a container's config the way its process will: its module's class, its file, image env + its env."""
    spec = container(workload, name)
    module, flag, _config_path = spec["args"]
    assert flag == "--config" and module in SERVICE_CONFIGS, spec["args"]
    config_cls = SERVICE_CONFIGS[module]
    assert (REPO / module.replace(".", "/") / "__main__.py").exists()
    # The config file comes from the ConfigMap mounted at the file's directory.
    path = tmp_path / f"{workload['metadata']['name']}-{name}.yaml"
    path.write_text(config_text(rendered, workload, spec))
    env = {**image_environment(), **resolve_env(spec, rendered)}
    with monkeypatch.context() as patch:
        for key in [key for key in os.environ if key.startswith("DAMSELFLY_")]:
            patch.delenv(key)
        for key, value in env.items():
            if not key.startswith("DAMSELFLY_"):
                continue
            # pydantic-settings ignores unknown variables, so a misspelt one would pass silently.
            field_name = key.removeprefix("DAMSELFLY_").lower().split("__")[0]
            assert field_name in config_cls.model_fields, f"{name}: {key} is not a {config_cls.__name__} setting"
            patch.setenv(key, value)
        return load_config(config_cls, path)


def config_text(rendered: Rendered, workload: dict[str, Any], spec: dict[str, Any]) -> str:
    """The text of the config file a container is started with."""
    config_path = Path(spec["args"][2])
    pod = workload["spec"]["template"]["spec"]
    [mount] = [m for m in spec["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    data: dict[str, str] = rendered.get("ConfigMap", volume["configMap"]["name"])["data"]
    return data[config_path.name]


def values_for(label: str) -> dict[str, Any]:
    """One of VALUE_SETS."""
    values = VALUE_SETS[label]
    return seed_values() if values is None else values


def render(chart: helm.Chart, values: dict[str, Any] | None = None) -> Rendered:
    """Render the chart offline as release 'rel' in namespace 'ns'."""
    return Rendered(chart.render(values or {}, name=RELEASE, namespace=NAMESPACE))


def schema_node(schema: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    """The sub-schema of a values path."""
    node = schema
    for part in path:
        node = node["properties"][part]
    return node


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def default_render(chart: helm.Chart) -> Rendered:
    return render(chart)


@pytest.fixture(scope="module")
def seed_render(chart: helm.Chart) -> Rendered:
    return render(chart, seed_values())


# -- lint and Kubernetes schemas -------------------------------------------------------------------


@pytest.mark.parametrize("label", sorted(VALUE_SETS))
def test_the_chart_lints_clean(label: str) -> None:
    report = helm.lint(CHART, values_for(label), strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [message for message in report["messages"] if message["severity"] >= 2]
    assert report["total_charts_linted"] == 1
    assert not problems and not report["errors"], problems or report["errors"]


@pytest.mark.parametrize("label", sorted(VALUE_SETS))
def test_every_object_is_valid_kubernetes(chart: helm.Chart, label: str) -> None:
    rendered = render(chart, values_for(label))
    kinds = set()
    for manifest in rendered.manifests():
        kinds.add(manifest["kind"])
        if manifest["kind"] == "ServiceMonitor":
            continue  # A CRD: kubernetes_validate has no schema for it; test_service_monitors checks it.
        try:
            kubernetes_validate.validate(manifest, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{manifest['kind']} {manifest['metadata']['name']}: {where}: {exc.message}")
    assert {"ConfigMap", "Service", "Deployment", "StatefulSet", "DaemonSet", "Pod"} <= kinds


def test_default_render_has_every_component(default_render: Rendered) -> None:
    assert default_render.has("Deployment", "rel-damselfly-scheduler")
    assert default_render.has("Service", "rel-damselfly-scheduler")
    assert default_render.has("PersistentVolumeClaim", "rel-damselfly-scheduler")
    assert default_render.has("StatefulSet", "rel-damselfly-seed")
    assert default_render.has("DaemonSet", "rel-damselfly-node")
    assert default_render.has("StatefulSet", "rel-damselfly-nats")
    assert not default_render.of_kind("ServiceMonitor")
    assert not default_render.of_kind("Secret")


# -- the Dragonfly values file ---------------------------------------------------------------------


def test_seed_values_keep_dragonflys_proxy_behaviour(seed_render: Rendered) -> None:
    proxy = seed_render.config("rel-damselfly-node", "registry-proxy.yaml")
    assert proxy["port"] == 65001 and proxy["host"] == "0.0.0.0"
    assert proxy["registry_mirror"] == {"url": "https://index.docker.io", "dynamic": True}
    assert proxy["proxies"] == [{"regx": "blobs/sha256.*"}]
    assert proxy["default_filter"] == "Expires&Signature&ns"
    assert proxy["prefetch"] is True
    assert proxy["telemetry"]["log_level"] == "DEBUG"  # dfdaemon.config.verbose
    assert "pprofPort" not in proxy and "verbose" not in proxy
    daemonset = seed_render.get("DaemonSet", "rel-damselfly-node")
    assert daemonset["spec"]["template"]["spec"]["hostNetwork"] is True
    assert container(daemonset, "registry-proxy")["ports"][0]["containerPort"] == 65001
    # The seed may fetch from the mirror; the scheduler and seed are as many as Dragonfly's.
    seed = seed_render.config("rel-damselfly-seed", "seed-fetcher.yaml")
    assert seed["allowed_registries"] == ["https://index.docker.io"]
    assert seed["telemetry"]["log_level"] == "DEBUG"
    assert seed_render.get("StatefulSet", "rel-damselfly-seed")["spec"]["replicas"] == 1
    assert seed_render.get("Deployment", "rel-damselfly-scheduler")["spec"]["replicas"] == 1
    scheduler = seed_render.config("rel-damselfly-scheduler", "scheduler.yaml")
    assert scheduler["telemetry"]["log_level"] == "DEBUG" and "pprofPort" not in scheduler
    for ignored in ("manager", "pprofPort", "seedPeer.config.download.prefetch"):
        assert ignored in seed_render.notes


def test_every_translated_dragonfly_key_arrives(chart: helm.Chart) -> None:
    rendered = render(chart, DRAGONFLY_CHANGED)
    proxy = rendered.config("rel-damselfly-node", "registry-proxy.yaml")
    assert proxy["port"] == 65005
    assert proxy["registry_mirror"] == {"url": "https://registry.example.com:5000", "dynamic": False, "insecure": True}
    assert proxy["proxies"] == [{"regx": "blobs/sha256.*"}, {"regx": "manifests/.*", "direct": True}]
    assert proxy["default_filter"] == "X-Amz-Date&Expires"
    assert proxy["prefetch"] is False  # A false must survive (sprig's merge would drop it).
    assert proxy["telemetry"]["log_level"] == "INFO"
    assert rendered.config("rel-damselfly-node", "chunk-fuse.yaml")["mirror_url"] == "http://127.0.0.1:65005"
    daemonset = rendered.get("DaemonSet", "rel-damselfly-node")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is False and "dnsPolicy" not in pod
    [port] = container(daemonset, "registry-proxy")["ports"]
    assert port == {
        "name": "proxy",
        "containerPort": 65005,
        "hostPort": 65005,
        "hostIP": "127.0.0.1",
        "protocol": "TCP",
    }
    assert {p["port"] for p in rendered.get("Service", "rel-damselfly-node")["spec"]["ports"]} == {65005, 40901}
    seed = rendered.config("rel-damselfly-seed", "seed-fetcher.yaml")
    assert seed["allowed_registries"] == ["https://registry.example.com:5000"] and seed["insecure"] is True
    assert seed["telemetry"]["log_level"] == "DEBUG"
    statefulset = rendered.get("StatefulSet", "rel-damselfly-seed")
    assert statefulset["spec"]["replicas"] == 2
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert claim["spec"]["storageClassName"] == "fast"
    # seedPeer.metrics.serviceMonitor.enable turns on the seed's monitor alone; dfdaemon's metrics are off.
    assert [m["metadata"]["name"] for m in rendered.of_kind("ServiceMonitor")] == ["rel-damselfly-seed"]


def test_native_config_wins_over_translated_dragonfly_config(chart: helm.Chart) -> None:
    values = {
        "dfdaemon": {"config": {"download": {"prefetch": False}, "proxy": {"defaultFilter": "a"}}},
        "node": {"proxy": {"config": {"prefetch": True}}},
    }
    proxy = render(chart, values).config("rel-damselfly-node", "registry-proxy.yaml")
    assert proxy["prefetch"] is True and proxy["default_filter"] == "a"


def test_a_tls_proxy_listener_is_refused_clearly(chart: helm.Chart) -> None:
    values = {"dfdaemon": {"config": {"proxy": {"security": {"insecure": False}}}}}
    with pytest.raises(helm.HelmRenderError, match=r"security\.insecure is false.*plain HTTP"):
        render(chart, values)


# -- configs: loaded by the real classes -----------------------------------------------------------


@pytest.mark.parametrize("label", sorted(VALUE_SETS))
def test_every_container_config_loads_in_its_service(
    chart: helm.Chart, label: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered = render(chart, values_for(label))
    loaded = {}
    for workload in rendered.objects:
        if workload["kind"] not in WORKLOAD_KINDS or workload["metadata"]["name"].endswith("-nats"):
            continue
        for spec in workload["spec"]["template"]["spec"]["containers"]:
            config = load_container_config(workload, spec["name"], rendered, tmp_path, monkeypatch)
            # The port the process binds is the port the pod declares, and the image's env did not win.
            assert [p["containerPort"] for p in spec["ports"]] == [config.bind_port]
            assert config.workdir == Path(WORKDIR)
            assert config.host == yaml.safe_load(config_text(rendered, workload, spec))["host"]
            loaded[(workload["kind"], spec["name"])] = config
    assert len(loaded) == 6  # scheduler; seed-fetcher + seed cache-store; proxy + cache-store + chunk-fuse.

    proxy = loaded[("DaemonSet", "registry-proxy")]
    node_store = loaded[("DaemonSet", "cache-store")]
    agent = loaded[("DaemonSet", "chunk-fuse")]
    fetcher = loaded[("StatefulSet", "seed-fetcher")]
    seed_store = loaded[("StatefulSet", "cache-store")]
    assert isinstance(proxy, RegistryProxyConfig) and isinstance(agent, ChunkFuseConfig)
    assert isinstance(node_store, CacheStoreConfig) and isinstance(seed_store, CacheStoreConfig)
    assert isinstance(fetcher, SeedFetcherConfig)
    assert isinstance(loaded[("Deployment", "scheduler")], SchedulerConfig)
    # A node's proxy and cache-store share one piece store and one peer id (what `damselfly up` sets).
    assert proxy.effective_storage_dir == node_store.effective_storage_dir
    assert proxy.database_url == node_store.effective_database_url
    assert proxy.effective_peer_id == node_store.effective_peer_id
    assert proxy.cache_store_url == f"http://127.0.0.1:{node_store.bind_port}"
    assert node_store.proxy_url.endswith(f":{proxy.bind_port}")
    assert not node_store.is_seed
    assert agent.mirror_url == f"http://127.0.0.1:{proxy.bind_port}"
    # The seed node: the fetcher writes where its cache-store serves from, under the same peer id.
    assert seed_store.is_seed
    assert fetcher.effective_storage_dir == seed_store.effective_storage_dir
    assert fetcher.database_url == seed_store.effective_database_url
    assert fetcher.effective_seed_id == seed_store.effective_peer_id
    # Everyone on one bus.
    assert len({config.nats.url for config in loaded.values()}) == 1


def test_configs_follow_native_values(chart: helm.Chart, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rendered = render(chart, EVERYTHING_ON)
    proxy = rendered.config("rel-damselfly-node", "registry-proxy.yaml")
    assert proxy["allowed_registries"] == ["https://ghcr.io"] and proxy["parallel_pieces"] == 8
    assert proxy["telemetry"] == {"log_level": "INFO", "otlp_endpoint": None, "json_logs": False}
    assert rendered.config("rel-damselfly-node", "chunk-fuse.yaml")["cache_size_limit"] == 10737418240
    assert rendered.config("rel-damselfly-node", "chunk-fuse.yaml")["host"] == "0.0.0.0"  # Off the host network.
    seed = rendered.config("rel-damselfly-seed", "seed-fetcher.yaml")
    assert seed["allowed_registries"] == ["https://index.docker.io", "https://ghcr.io"]
    assert seed["parallel_ranges"] == 8
    assert rendered.config("rel-damselfly-seed", "cache-store.yaml")["upload_slots"] == 100
    scheduler_config = rendered.config("rel-damselfly-scheduler", "scheduler.yaml")
    assert scheduler_config["nats"]["url"] == "nats://nats-a:4222,nats://nats-b:4222"
    assert not rendered.has("StatefulSet", "rel-damselfly-nats")
    deployment = rendered.get("Deployment", "rel-damselfly-scheduler")
    config = load_container_config(deployment, "scheduler", rendered, tmp_path, monkeypatch)
    assert isinstance(config, SchedulerConfig)
    assert config.effective_database_url == EVERYTHING_ON["externalDatabase"]["url"]
    assert config.api.token.get_secret_value() == "secret-token"
    assert config.api.open_reads is True
    pod = deployment["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert not any(v["name"] == "data" and "persistentVolumeClaim" in v for v in pod["volumes"])
    assert "strategy" not in deployment["spec"] and deployment["spec"]["replicas"] == 3
    assert rendered.get("Secret", "rel-damselfly-database")["stringData"]["database-url"].startswith("postgresql")
    assert not rendered.has("PersistentVolumeClaim", "rel-damselfly-scheduler")
    assert rendered.get("Deployment", "rel-damselfly-scheduler")["metadata"]["labels"]["team"] == "platform"


def nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model of a nested block (``Block`` or ``list[Block]``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        model = nested_model(argument)
        if model is not None:
            return model
    return None


def test_the_schema_offers_exactly_the_services_settings() -> None:
    """Each config block of values.schema.json lists every field of its class but those the chart sets."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    for path, (module, managed) in MANAGED_KEYS.items():
        config_cls = SERVICE_CONFIGS[module]
        block = schema_node(schema, (*path, "config"))
        where = ".".join(path) + ".config"
        assert block["additionalProperties"] is False
        offered = set(block["properties"]) - (DRAGONFLY_CONFIG_KEYS if path == ("scheduler",) else set())
        expected = set(config_cls.model_fields) - managed
        assert offered == expected, f"{where}: missing {expected - offered}, stale {offered - expected}"
        for name in sorted(offered):
            model = nested_model(config_cls.model_fields[name].annotation)
            if model is None:
                continue
            sub = block["properties"][name]
            sub = sub.get("items", sub)  # A list of blocks (proxies).
            assert sub["additionalProperties"] is False, f"{where}.{name}"
            nested_expected = set(model.model_fields) - NESTED_MANAGED.get(name, set())
            assert set(sub["properties"]) == nested_expected, f"{where}.{name}: schema differs from {model.__name__}"


def test_the_schema_file_is_what_the_generator_writes() -> None:
    """values.schema.json is generated from the config classes; a changed class needs a regenerated file."""
    spec = importlib.util.spec_from_file_location("generate_schema", CHART / "hack" / "generate_schema.py")
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    expected = generator.render_schema()
    assert (CHART / "values.schema.json").read_text() == expected, (
        "helm/damselfly/values.schema.json is stale: run `uv run python helm/damselfly/hack/generate_schema.py`"
    )


# -- schema and failures ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"scheduler": {"replicaz": 2}}, r"additional properties 'replicaz' not allowed"),
        ({"node": {"proxy": {"port": "65001"}}}, r"/node/proxy/port.*got string, want integer"),
        ({"node": {"proxy": {"config": {"prefech": False}}}}, r"additional properties 'prefech' not allowed"),
        ({"node": {"proxy": {"config": {"port": 1}}}}, r"additional properties 'port' not allowed"),
        ({"scheduler": {"config": {"peer_stale_after_seconds": "soon"}}}, r"got string, want number"),
        ({"dfdaemon": {"config": {"proxy": {"registryMirror": {"ulr": "https://x"}}}}}, r"'ulr' not allowed"),
        ({"seedPeer": {"replicas": "one"}}, r"/seedPeer/replicas.*got string, want integer"),
        ({"dfdaemon": {"replicas": 3}}, r"additional properties 'replicas' not allowed"),  # A DaemonSet.
        ({"serviceMonitor": {"enable": True}}, r"additional properties 'enable' not allowed"),
    ],
)
def test_the_schema_rejects_typos_and_wrong_types(chart: helm.Chart, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=message):
        render(chart, values)


def test_sqlite_with_several_scheduler_replicas_fails_clearly(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"scheduler\.replicas is 2 but .*SQLite.*externalDatabase\.url"):
        render(chart, {"scheduler": {"replicas": 2}})


def test_external_nats_is_required_without_the_bundled_one(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"set externalNats\.url"):
        render(chart, {"nats": {"enabled": False}})


# -- workloads -------------------------------------------------------------------------------------


def test_the_node_agent_runs_on_the_host_network_with_a_privileged_fuse_agent(default_render: Rendered) -> None:
    daemonset = default_render.get("DaemonSet", "rel-damselfly-node")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert [c["name"] for c in pod["containers"]] == ["registry-proxy", "cache-store", "chunk-fuse"]
    agent = container(daemonset, "chunk-fuse")
    assert agent["securityContext"]["privileged"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in agent["volumeMounts"]}
    assert volumes["fuse"]["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    assert mounts["fuse"]["mountPath"] == "/dev/fuse"
    assert mounts["run"]["mountPropagation"] == "Bidirectional"
    assert volumes["data"]["hostPath"]["path"] == WORKDIR
    # The agent's control API stays on the node's loopback; its probes follow it there.
    assert default_render.config("rel-damselfly-node", "chunk-fuse.yaml")["host"] == "127.0.0.1"
    assert agent["livenessProbe"]["httpGet"]["host"] == "127.0.0.1"
    # The cache-store announces an address other nodes reach: the node's.
    env = {e["name"]: e for e in container(daemonset, "cache-store")["env"]}
    assert env["DAMSELFLY_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert env["DAMSELFLY_PROXY_URL"]["value"] == "http://$(DAMSELFLY_ADVERTISE_HOST):65001"


def test_the_seed_keeps_its_cache_on_a_volume_claim(default_render: Rendered) -> None:
    statefulset = default_render.get("StatefulSet", "rel-damselfly-seed")
    assert [c["name"] for c in statefulset["spec"]["template"]["spec"]["containers"]] == ["seed-fetcher", "cache-store"]
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "cache"
    for name in ("seed-fetcher", "cache-store"):
        mounts = {m["name"]: m["mountPath"] for m in container(statefulset, name)["volumeMounts"]}
        assert mounts["cache"] == WORKDIR
    service = default_render.get("Service", statefulset["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert default_render.config("rel-damselfly-seed", "cache-store.yaml")["is_seed"] is True


def test_nats_runs_jetstream(default_render: Rendered) -> None:
    nats = default_render.get("StatefulSet", "rel-damselfly-nats")
    args = container(nats, "nats")["args"]
    assert "-js" in args and "/data" in args
    url = default_render.config("rel-damselfly-scheduler", "scheduler.yaml")["nats"]["url"]
    assert url == "nats://rel-damselfly-nats.ns.svc:4222"
    assert default_render.has("Service", "rel-damselfly-nats")


@pytest.mark.parametrize("label", ["defaults", "seed"])
def test_every_container_has_health_probes(chart: helm.Chart, label: str) -> None:
    rendered = render(chart, values_for(label))
    checked = 0
    for workload in rendered.objects:
        if workload["kind"] not in WORKLOAD_KINDS:
            continue
        for spec in workload["spec"]["template"]["spec"]["containers"]:
            ports = {p["name"] for p in spec["ports"]}
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                get = spec[probe]["httpGet"]
                assert get["port"] in ports, f"{spec['name']}: {probe} on an undeclared port"
                if spec["name"] == "nats":
                    assert get["path"].startswith("/healthz")
                else:
                    assert get["path"] == path, f"{spec['name']}: {probe} is {get['path']}"
            checked += 1
    assert checked == 7


def test_every_object_carries_the_recommended_labels(default_render: Rendered) -> None:
    for obj in default_render.objects:
        labels = obj["metadata"]["labels"]
        missing = [label for label in RECOMMENDED_LABELS if label not in labels]
        assert not missing, f"{obj['kind']} {obj['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/part-of"] == "damselfly"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        if obj["kind"] in WORKLOAD_KINDS:
            selector = obj["spec"]["selector"]["matchLabels"]
            template_labels = obj["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= template_labels.items()
            assert "app.kubernetes.io/version" not in selector  # Selectors are immutable across upgrades.
    for service in default_render.of_kind("Service"):
        selected = service["spec"]["selector"]
        assert any(
            w["kind"] in WORKLOAD_KINDS and selected.items() <= w["spec"]["template"]["metadata"]["labels"].items()
            for w in default_render.objects
        ), f"Service {service['metadata']['name']} selects no pods"


def test_service_monitors(chart: helm.Chart) -> None:
    rendered = render(chart, {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}})
    monitors = {m["metadata"]["name"]: m for m in rendered.of_kind("ServiceMonitor")}
    assert set(monitors) == {"rel-damselfly-scheduler", "rel-damselfly-seed", "rel-damselfly-node"}
    for name, monitor in monitors.items():
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "prom"
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        service = rendered.get("Service", name)
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        service_ports = {p["name"] for p in service["spec"]["ports"]}
        assert monitor["spec"]["endpoints"]
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in service_ports and endpoint["path"] == "/metrics"
            assert re.fullmatch(r"\d+(ms|s|m|h)", endpoint["interval"])
    # A component with metrics off is left out.
    rendered = render(chart, {"serviceMonitor": {"enabled": True}, "node": {"metrics": {"enable": False}}})
    assert "rel-damselfly-node" not in {m["metadata"]["name"] for m in rendered.of_kind("ServiceMonitor")}


def test_helm_test_pod_checks_the_scheduler_and_a_node_mirror(default_render: Rendered) -> None:
    [pod] = [p for p in default_render.of_kind("Pod") if "/tests/" in p["__template"]]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    script = " ".join(pod["spec"]["containers"][0]["args"])
    assert "curl" in script
    urls = re.findall(r"http://([\w.-]+):(\d+)(/\S*)", script)
    targets = {(host.split(".")[0], int(port), path) for host, port, path in urls}
    assert ("rel-damselfly-scheduler", 8002, "/readyz") in targets
    assert ("rel-damselfly-node", 65001, "/v2/") in targets
    for host, port, _path in targets:  # Every URL names a rendered Service and one of its ports.
        assert port in {p["port"] for p in default_render.get("Service", host)["spec"]["ports"]}


def test_notes_tell_how_to_use_the_release(default_render: Rendered) -> None:
    assert "helm test rel --namespace ns" in default_render.notes
    assert 'host."http://127.0.0.1:65001"' in default_render.notes
    assert "manager" not in default_render.notes  # No Dragonfly translation notes without Dragonfly values.
