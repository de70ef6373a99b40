"""The shipped Grafana dashboard: well formed, and every metric it queries is one the services export."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from services.cache_store.app import create_app as create_cache_store
from services.cache_store.config import CacheStoreConfig
from services.chunk_fuse.app import create_app as create_chunk_fuse
from services.chunk_fuse.config import ChunkFuseConfig
from services.piece_scheduler.app import create_app as create_scheduler
from services.piece_scheduler.config import SchedulerConfig
from services.registry_proxy.app import create_app as create_registry_proxy
from services.registry_proxy.config import RegistryProxyConfig
from services.seed_fetcher.app import create_app as create_seed_fetcher
from services.seed_fetcher.config import SeedFetcherConfig

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "damselfly-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}

SERVICES: list[tuple[type[Any], Callable[[Any], FastAPI]]] = [
    (SchedulerConfig, create_scheduler),
    (CacheStoreConfig, create_cache_store),
    (SeedFetcherConfig, create_seed_fetcher),
    (RegistryProxyConfig, create_registry_proxy),
    (ChunkFuseConfig, create_chunk_fuse),
]

# What the exposition format calls each family's samples (prometheus_client drops _total from counter
# family names; *_created is disabled in shared.metrics).
_SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}
# PromQL words that are not metric names: functions, aggregations, operators, modifiers.
_PROMQL_WORDS = {
    "sum", "count", "avg", "min", "max", "topk", "bottomk", "quantile", "group", "stddev", "stdvar",
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "clamp_min", "clamp_max",
    "abs", "ceil", "floor", "round", "label_replace", "label_join", "vector", "scalar", "time", "absent",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
}  # fmt: skip


def exported_sample_names(tmp_path: Path) -> dict[str, set[str]]:
    """Every sample name each service's real app exports (its registry, built as at start-up)."""
    exported: dict[str, set[str]] = {}
    for config_cls, create_app in SERVICES:
        app = create_app(config_cls(workdir=tmp_path / config_cls.service))
        names = set()
        for family in app.state.metrics.registry.collect():
            names.update(family.name + suffix for suffix in _SAMPLE_SUFFIXES[family.type])
        exported[config_cls.service] = names
    return exported


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: what is left once strings, matchers and keywords are out."""
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # String literals (label values).
    stripped = re.sub(r"\{[^}]*\}", "", stripped)  # Label matchers.
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)  # Range durations.
    stripped = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", stripped)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", stripped))
    return words - _PROMQL_WORDS


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those in collapsed rows too."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def test_the_dashboard_is_a_grafana_dashboard_on_a_prometheus_datasource_variable(dashboard: dict[str, Any]) -> None:
    assert dashboard["title"] and dashboard["uid"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    [variable] = [v for v in dashboard["templating"]["list"] if v["name"] == "DS_PROMETHEUS"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"

    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [panel for panel in panels(dashboard) if panel["type"] != "row"]
    assert len(graphs) >= 12
    for panel in graphs:
        assert panel["title"] and panel["description"], panel["id"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_the_dashboard_answers_what_an_operator_graphs(dashboard: dict[str, Any]) -> None:
    exprs = " ".join(target["expr"] for panel in panels(dashboard) for target in panel.get("targets", []))
    for wanted in (
        "damselfly_proxy_served_bytes_total",  # Traffic by source, and the saved ratio.
        "damselfly_seed_back_to_source_total",
        "damselfly_proxy_piece_download_seconds_bucket",
        "damselfly_upload_slots_in_use",
        "damselfly_cache_disk_usage_bytes",
        "damselfly_cache_evictions_total",
        "damselfly_scheduler_assignments_total",
        "damselfly_scheduler_assignment_seconds_bucket",
        "damselfly_mount_read_latency_seconds_bucket",
        "damselfly_mount_bytes_fetched_total",
        "damselfly_scheduler_tasks",
    ):
        assert wanted in exprs, wanted
    [saved] = [panel for panel in panels(dashboard) if panel["title"] == "Traffic saved"]
    assert 'source!="origin"' in saved["targets"][0]["expr"]


def test_every_metric_the_dashboard_queries_is_exported_by_a_service(dashboard: dict[str, Any], tmp_path: Path) -> None:
    exported = exported_sample_names(tmp_path)
    everything = set().union(*exported.values())
    queried: set[str] = set()
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            names = metric_names(target["expr"])
            assert names, f"{panel['title']}: no metric in {target['expr']!r}"
            unknown = names - everything
            assert not unknown, f"{panel['title']}: {sorted(unknown)} are exported by no service"
            queried |= names
    # Every service's own metrics are on the dashboard somewhere.
    for service, prefix in (
        ("registry_proxy", "damselfly_proxy_"),
        ("seed_fetcher", "damselfly_seed_"),
        ("cache_store", "damselfly_cache_"),
        ("scheduler", "damselfly_scheduler_"),
        ("chunk_fuse", "damselfly_mount_"),
    ):
        assert any(name.startswith(prefix) and name in exported[service] for name in queried), service


def test_the_expression_parser_finds_metric_names_and_only_them() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, source) (rate(damselfly_x_seconds_bucket{source!="peer"}'
        "[$__rate_interval]))) / clamp_min(sum(increase(damselfly_y_total[$__range])), 1)"
    )
    assert metric_names(expr) == {"damselfly_x_seconds_bucket", "damselfly_y_total"}
    assert metric_names("count(up)") == {"up"}
