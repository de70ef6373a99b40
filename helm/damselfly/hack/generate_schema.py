"""Write helm/damselfly/values.schema.json: the chart's own keys, and each `config` block from its service's class.

Run from the repository root after changing a service's config or the chart's values:

    uv run python helm/damselfly/hack/generate_schema.py

tests/unit/test_helm_chart.py fails while the checked-in file differs from what this writes. The config
blocks offer every field of the service's pydantic class except those the chart sets itself (MANAGED);
the Dragonfly blocks offer the keys the chart translates or accepts and ignores (README.md).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

CHART = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(CHART.parents[1]))

from services.cache_store.config import CacheStoreConfig  # noqa: E402
from services.chunk_fuse.config import ChunkFuseConfig  # noqa: E402
from services.piece_scheduler.config import SchedulerConfig  # noqa: E402
from services.registry_proxy.config import RegistryProxyConfig  # noqa: E402
from services.seed_fetcher.config import SeedFetcherConfig  # noqa: E402
from shared.config import ServiceConfig  # noqa: E402

# Fields the chart sets (bind address, port, paths, peer ids, URLs between a node's processes, the database).
COMMON = {"host", "port", "node_name", "workdir"}
CACHE_STORE_MANAGED = COMMON | {"peer_id", "advertise_host", "proxy_url", "is_seed", "storage_dir", "database_url"}
MANAGED = {
    "scheduler": COMMON | {"database_url"},
    "seedFetcher": COMMON | {"seed_id", "storage_dir", "database_url"},
    "cacheStore": CACHE_STORE_MANAGED,
    "proxy": COMMON | {"cache_store_url", "peer_id", "storage_dir", "database_url"},
    "chunkFuse": COMMON | {"mirror_url", "fuse_device", "run_dir", "cache_dir"},
}
# Nested fields the chart sets (the NATS URL) or takes from a Secret (the admin token).
NESTED_MANAGED = {"nats": {"url"}, "api": {"token"}}
KEPT = {
    "type",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "pattern",
    "minLength",
    "items",
    "properties",
    "additionalProperties",
    "required",
    "anyOf",
    "description",
    "enum",
}


def _clean(node: Any, definitions: dict[str, Any]) -> Any:
    """A pydantic JSON schema node made self-contained (refs inlined) and reduced to what Helm checks."""
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(definitions[node["$ref"].split("/")[-1]])
        target.update({key: value for key, value in node.items() if key != "$ref"})
        return _clean(target, definitions)
    cleaned: dict[str, Any] = {}
    for key, value in node.items():
        if key not in KEPT:
            continue
        if key == "properties":
            cleaned[key] = {name: _clean(sub, definitions) for name, sub in value.items()}
        elif key == "items":
            cleaned[key] = _clean(value, definitions)
        elif key == "anyOf":
            options = [_clean(option, definitions) for option in value]
            if all(set(option) <= {"type"} for option in options):
                cleaned["type"] = [option["type"] for option in options]
            else:
                cleaned[key] = options
        else:
            cleaned[key] = value
    return cleaned


def config_schema(
    config_cls: type[ServiceConfig], managed: set[str], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The schema of a `config` block: the class's fields less the managed ones."""
    full = config_cls.model_json_schema()
    definitions = full.get("$defs", {})
    properties: dict[str, Any] = {}
    for name, sub in full["properties"].items():
        if name in managed:
            continue
        sub = _clean(sub, definitions)
        for hidden in NESTED_MANAGED.get(name, set()):
            sub.get("properties", {}).pop(hidden, None)
        if sub.get("type") == "object":
            sub["additionalProperties"] = False
        properties[name] = sub
    properties.update(extra or {})
    source = config_cls.__module__.replace(".", "/")
    return {
        "type": "object",
        "description": f"{config_cls.__name__} settings ({source}.py); the chart sets {', '.join(sorted(managed))}.",
        "additionalProperties": False,
        "properties": dict(sorted(properties.items())),
    }


def strict(properties: dict[str, Any], description: str | None = None, required: list[str] | None = None) -> Any:
    """An object that takes these keys only."""
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties}
    if description:
        schema["description"] = description
    if required:
        schema["required"] = required
    return schema


STRING = {"type": "string"}
BOOLEAN = {"type": "boolean"}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
REPLICAS = {"type": "integer", "minimum": 0}
ABSOLUTE_PATH = {"type": "string", "pattern": "^/"}
KUBERNETES_OBJECT = {"type": "object"}  # resources, affinity, updateStrategy: the API server checks them.
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
TOLERATIONS = {"type": "array", "items": {"type": "object"}}
QUANTITY = {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?([EPTGMK]i?|[mk])?$"}
DURATION = {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}
ACCESS_MODES = {
    "type": "array",
    "minItems": 1,
    "items": {"type": "string", "enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]},
}
IMAGE = strict(
    {"repository": STRING, "tag": STRING, "pullPolicy": {"type": "string", "enum": ["Always", "IfNotPresent", "Never"]}}
)
PERSISTENCE = strict({"enabled": BOOLEAN, "size": QUANTITY, "storageClass": STRING, "accessModes": ACCESS_MODES})
METRICS = strict(
    {
        "enable": {
            "type": "boolean",
            "description": "Include the component in the ServiceMonitors (/metrics is always served).",
        },
        "serviceMonitor": strict(
            {
                "enable": {
                    "type": "boolean",
                    "description": "A ServiceMonitor for this component even when serviceMonitor.enabled is false.",
                }
            }
        ),
    }
)
POD = {
    "resources": KUBERNETES_OBJECT,
    "nodeSelector": STRING_MAP,
    "tolerations": TOLERATIONS,
    "affinity": KUBERNETES_OBJECT,
    "podAnnotations": STRING_MAP,
}
DRAGONFLY_DEBUG = {
    "verbose": {"type": "boolean", "description": "Dragonfly: true sets telemetry.log_level to DEBUG."},
    "pprofPort": {"type": "integer", "description": "Dragonfly: accepted and ignored (no pprof in Damselfly)."},
}
PLACEMENT = {"nodeSelector": STRING_MAP, "tolerations": TOLERATIONS, "affinity": KUBERNETES_OBJECT}


def build_schema() -> dict[str, Any]:
    """The whole values schema."""
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Damselfly chart values (generated by hack/generate_schema.py)",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "global": {"type": "object", "description": "Helm's global values (unused by this chart)."},
            "nameOverride": STRING,
            "fullnameOverride": STRING,
            "commonLabels": STRING_MAP,
            "image": IMAGE,
            "imagePullSecrets": {"type": "array", "items": strict({"name": STRING}, required=["name"])},
            "nats": strict(
                {
                    "enabled": BOOLEAN,
                    "image": IMAGE,
                    "port": PORT,
                    "monitorPort": PORT,
                    "persistence": PERSISTENCE,
                    "resources": KUBERNETES_OBJECT,
                    **PLACEMENT,
                }
            ),
            "externalNats": strict({"url": {"type": "string", "pattern": "^$|^(nats|tls|ws|wss)://"}}),
            "externalDatabase": strict(
                {
                    "url": {
                        "type": "string",
                        "description": "SQLAlchemy URL, e.g. postgresql+psycopg://user:password@host:5432/damselfly.",
                    },
                    "existingSecret": STRING,
                    "existingSecretKey": {"type": "string", "minLength": 1},
                }
            ),
            "serviceMonitor": strict(
                {"enabled": BOOLEAN, "interval": DURATION, "scrapeTimeout": DURATION, "labels": STRING_MAP}
            ),
            "scheduler": strict(
                {
                    "enable": BOOLEAN,
                    "replicas": REPLICAS,
                    "port": PORT,
                    "service": strict({"type": {"type": "string", "enum": ["ClusterIP", "NodePort", "LoadBalancer"]}}),
                    "persistence": PERSISTENCE,
                    "adminToken": strict(
                        {"existingSecret": STRING, "existingSecretKey": {"type": "string", "minLength": 1}}
                    ),
                    **POD,
                    "metrics": METRICS,
                    "config": config_schema(SchedulerConfig, MANAGED["scheduler"], DRAGONFLY_DEBUG),
                },
                "The piece-scheduler (Dragonfly's `scheduler` block has the same keys).",
            ),
            "seedFetcher": strict(
                {
                    "enable": BOOLEAN,
                    "replicas": REPLICAS,
                    "port": PORT,
                    "persistence": PERSISTENCE,
                    **POD,
                    "metrics": METRICS,
                    "config": config_schema(SeedFetcherConfig, MANAGED["seedFetcher"]),
                    "cacheStore": strict(
                        {
                            "port": PORT,
                            "resources": KUBERNETES_OBJECT,
                            "config": config_schema(CacheStoreConfig, MANAGED["cacheStore"]),
                        }
                    ),
                },
                "The seed node: seed-fetcher and seed cache-store in a StatefulSet.",
            ),
            "node": strict(
                {
                    "enable": BOOLEAN,
                    "hostNetwork": BOOLEAN,
                    "dataDir": ABSOLUTE_PATH,
                    "runDir": ABSOLUTE_PATH,
                    "priorityClassName": STRING,
                    "updateStrategy": KUBERNETES_OBJECT,
                    **POD,
                    "metrics": METRICS,
                    "proxy": strict(
                        {
                            "port": PORT,
                            "listen": STRING,
                            "resources": KUBERNETES_OBJECT,
                            "config": config_schema(RegistryProxyConfig, MANAGED["proxy"]),
                        }
                    ),
                    "cacheStore": strict(
                        {
                            "port": PORT,
                            "resources": KUBERNETES_OBJECT,
                            "config": config_schema(CacheStoreConfig, MANAGED["cacheStore"]),
                        }
                    ),
                    "chunkFuse": strict(
                        {
                            "enable": BOOLEAN,
                            "port": PORT,
                            "listen": STRING,
                            "resources": KUBERNETES_OBJECT,
                            "config": config_schema(ChunkFuseConfig, MANAGED["chunkFuse"]),
                        }
                    ),
                },
                "The node agent DaemonSet: registry-proxy, cache-store and chunk-fuse.",
            ),
            "tests": strict({"image": IMAGE}),
            # Dragonfly's blocks, translated in templates/_helpers.tpl.
            "seedPeer": strict(
                {
                    "enable": BOOLEAN,
                    "replicas": REPLICAS,
                    **PLACEMENT,
                    "metrics": METRICS,
                    "persistence": strict(
                        {"enable": BOOLEAN, "size": QUANTITY, "storageClass": STRING, "accessModes": ACCESS_MODES}
                    ),
                    "config": strict(
                        {
                            **DRAGONFLY_DEBUG,
                            "download": strict(
                                {
                                    "prefetch": {
                                        "type": "boolean",
                                        "description": "Accepted and ignored: a seed always fetches whole blobs.",
                                    }
                                }
                            ),
                        }
                    ),
                },
                "Dragonfly's seed peer, translated onto seedFetcher (README.md).",
            ),
            "dfdaemon": strict(
                {
                    "enable": BOOLEAN,
                    "hostNetwork": BOOLEAN,
                    **PLACEMENT,
                    "metrics": METRICS,
                    "config": strict(
                        {
                            **DRAGONFLY_DEBUG,
                            "download": strict(
                                {"prefetch": {"type": "boolean", "description": "The registry-proxy's prefetch."}}
                            ),
                            "proxy": strict(
                                {
                                    "defaultFilter": {
                                        "type": "string",
                                        "description": "The registry-proxy's default_filter.",
                                    },
                                    "security": strict(
                                        {
                                            "insecure": {
                                                "type": "boolean",
                                                "description": "Must be true: the proxy listener is plain HTTP.",
                                            }
                                        }
                                    ),
                                    "tcpListen": strict({"listen": STRING, "port": PORT}),
                                    "registryMirror": strict(
                                        {
                                            "url": {"type": "string", "pattern": "^https?://[^/]+"},
                                            "dynamic": BOOLEAN,
                                            "insecure": BOOLEAN,
                                        }
                                    ),
                                    "proxies": {
                                        "type": "array",
                                        "items": strict(
                                            {"regx": {"type": "string", "minLength": 1}, "direct": BOOLEAN},
                                            required=["regx"],
                                        ),
                                    },
                                }
                            ),
                        }
                    ),
                },
                "Dragonfly's dfdaemon, translated onto node (README.md).",
            ),
            "manager": {
                "type": "object",
                "description": "Dragonfly's manager: no Damselfly counterpart; accepted and ignored.",
            },
        },
    }


def render_schema() -> str:
    """The file's text."""
    return json.dumps(build_schema(), indent=2) + "\n"


if __name__ == "__main__":
    (CHART / "values.schema.json").write_text(render_schema())
