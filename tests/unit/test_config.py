"""Config loading: YAML + DAMSELFLY_* variables, and one-line errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cache_store.config import CacheStoreConfig, peer_id_from
from services.chunk_fuse.config import ChunkFuseConfig
from services.piece_scheduler.config import SchedulerConfig
from services.registry_proxy.config import RegistryProxyConfig
from services.seed_fetcher.config import SeedFetcherConfig
from shared.config import load_config
from shared.errors import ConfigError
from shared.registry_client import normalise_origin

ALL_CONFIGS = [SchedulerConfig, CacheStoreConfig, SeedFetcherConfig, RegistryProxyConfig, ChunkFuseConfig]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("DAMSELFLY_"):
            monkeypatch.delenv(key)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("config_cls", ALL_CONFIGS)
def test_every_service_loads_with_defaults_and_has_its_default_port(config_cls: type, tmp_path: Path) -> None:
    config = load_config(config_cls, write(tmp_path, f"workdir: {tmp_path}\n"))
    assert config.bind_port == config_cls.default_port
    assert config.nats.url == "nats://127.0.0.1:4222"
    assert config.workdir == tmp_path


def test_yaml_values_are_read_and_environment_overrides_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "port: 9000\nnats:\n  url: nats://yaml:1\n  replicas: 3\n")
    monkeypatch.setenv("DAMSELFLY_NATS__URL", "nats://env:2")
    monkeypatch.setenv("DAMSELFLY_PEER_STALE_AFTER_SECONDS", "3.5")
    config = load_config(SchedulerConfig, path)
    assert config.port == 9000
    assert config.nats.url == "nats://env:2"
    assert config.nats.replicas == 3  # The rest of the YAML block survives the nested override.
    assert config.peer_stale_after_seconds == 3.5


def test_unknown_top_level_key_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(SchedulerConfig, write(tmp_path, "prot: 80\n"))
    assert "unknown key 'prot'" in caught.value.message
    assert "\n" not in caught.value.message


def test_unknown_nested_key_names_the_dotted_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'nats\.urll'"):
        load_config(CacheStoreConfig, write(tmp_path, "nats:\n  urll: nats://x:1\n"))


def test_wrong_type_names_the_key_and_the_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(RegistryProxyConfig, write(tmp_path, "port: eighty\n"))
    message = caught.value.message
    assert "invalid value for 'port'" in message and "'eighty'" in message
    assert str(tmp_path / "config.yaml") in message


def test_wrong_type_from_the_environment_is_reported_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAMSELFLY_NATS__REPLICAS", "many")
    with pytest.raises(ConfigError, match=r"'nats\.replicas'.*environment|environment.*'nats\.replicas'"):
        load_config(SchedulerConfig, write(tmp_path, "{}\n"))


def test_several_problems_are_listed_on_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(SchedulerConfig, write(tmp_path, "port: x\nbogus: 1\n"))
    assert "'port'" in caught.value.message and "'bogus'" in caught.value.message
    assert "\n" not in caught.value.message


@pytest.mark.parametrize(
    ("text", "expected"),
    [("- a\n- b\n", "top level must be a mapping"), ("port: [1\n", "not valid YAML")],
)
def test_malformed_files_get_a_clear_error(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(SchedulerConfig, write(tmp_path, text))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(SchedulerConfig, tmp_path / "nope.yaml")


def test_bad_proxy_rule_regex_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"proxies\.0\.regx"):
        load_config(RegistryProxyConfig, write(tmp_path, "proxies:\n  - regx: 'blobs/(sha256'\n"))


def test_registry_mirror_url_must_be_http(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"registry_mirror\.url"):
        load_config(RegistryProxyConfig, write(tmp_path, "registry_mirror:\n  url: ftp://x\n"))


def test_allowed_origins_include_the_mirror_and_are_normalised(tmp_path: Path) -> None:
    config = load_config(
        RegistryProxyConfig,
        write(tmp_path, "registry_mirror: {url: 'http://127.0.0.1:5000/'}\nallowed_registries: ['Ghcr.IO']\n"),
    )
    assert config.allowed_origins == {"http://127.0.0.1:5000", "https://ghcr.io:443"}
    assert normalise_origin("https://index.docker.io") == "https://index.docker.io:443"


def test_peer_id_is_derived_from_a_node_name_with_dots() -> None:
    assert peer_id_from("node-1.example.com") == "node-1-example-com"
    assert peer_id_from("...") == "peer"
