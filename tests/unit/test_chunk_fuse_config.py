"""Mount configs: the seed's nydusd config.json as it is, Damselfly's own shape, and the CLI shortcuts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.chunk_fuse.mount_config import MountConfig, load_mount_config, mount_config_from_document, parse_size
from services.cli.container import ProcessUser, resolve_user
from shared.errors import ConfigError, InvalidRequest
from tests.support.images import shared_images_dir

SEED_CONFIG = shared_images_dir().parent / "seed" / "nydusd-config.json"


def test_the_seed_nydusd_config_is_accepted_as_it_is() -> None:
    config = load_mount_config(SEED_CONFIG)
    [mirror] = config.backend.mirrors
    assert mirror.host == "http://127.0.0.1:65001"
    assert mirror.headers == {"X-Dragonfly-Registry": "https://index.docker.io"}
    assert mirror.effective_ping_url == "http://127.0.0.1:40901/server/ping"
    assert config.backend.scheme == "https"
    assert config.backend.skip_verify is False
    assert (config.backend.timeout, config.backend.connect_timeout, config.backend.retry_limit) == (10, 10, 2)
    assert config.cache.type == "blobcache"
    assert config.cache.work_dir == Path("/var/lib/nydus/cache/")
    assert config.digest_validate is False
    assert config.enable_xattr is True
    prefetch = config.prefetch
    assert (prefetch.enable, prefetch.threads_count, prefetch.merging_size, prefetch.bandwidth_rate) == (
        True,
        10,
        131072,
        1048576,
    )


def test_a_native_config_in_yaml_with_sizes(tmp_path: Path) -> None:
    path = tmp_path / "mount.yaml"
    path.write_text(
        "backend:\n  mirrors: [{host: 'http://127.0.0.1:65001/', health_check_interval: 0.5}]\n  scheme: http\n"
        "cache: {work_dir: /tmp/cache, size_limit: 2GiB}\n"
        "prefetch: {enable: true, merging_size: 256K, bandwidth_rate: 10MiB, prefetch_all: true}\n"
        "amplify_io: 64KiB\n"
    )
    config = load_mount_config(path)
    assert config.backend.mirrors[0].host == "http://127.0.0.1:65001"
    assert config.backend.mirrors[0].effective_ping_url == "http://127.0.0.1:65001/v2/"
    assert config.cache.size_limit == 2 << 30
    assert config.prefetch.merging_size == 256 << 10
    assert config.prefetch.bandwidth_rate == 10 << 20
    assert config.amplify_io == 64 << 10
    assert config.digest_validate is True, "native configs check digests unless told not to"


@pytest.mark.parametrize(
    ("document", "key"),
    [
        ({"device": {"backend": {"type": "registry", "config": {"mirrorz": []}}}}, "device.backend.config.mirrorz"),
        ({"device": {}, "fs_prefetch": {"enable": True, "thread_count": 2}}, "fs_prefetch.thread_count"),
        ({"backend": {"retry_limt": 1}}, "backend.retry_limt"),
        ({"prefetch": {"merging_size": "lots"}}, "prefetch.merging_size"),
    ],
)
def test_a_typo_is_an_error_naming_the_key(document: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        mount_config_from_document(document)
    assert key in caught.value.message


def test_nydusd_keys_without_meaning_here_are_accepted() -> None:
    document = json.loads(SEED_CONFIG.read_text())
    document["device"]["backend"]["config"]["repo"] = "library/python"
    document["latest_read_files"] = True
    assert mount_config_from_document(document).backend.mirrors


def test_shortcuts_replace_mirrors_and_make_the_origin_insecure() -> None:
    config = load_mount_config(SEED_CONFIG).with_shortcuts(mirror="http://10.0.0.1:65001", insecure=True)
    assert [m.host for m in config.backend.mirrors] == ["http://10.0.0.1:65001"]
    assert config.backend.insecure and config.backend.skip_verify and config.backend.scheme == ""
    untouched = MountConfig.model_validate({}).with_shortcuts()
    assert untouched.backend.mirrors == [] and not untouched.backend.insecure


def test_sizes() -> None:
    assert parse_size(4096) == 4096
    assert parse_size("1M") == 1 << 20
    assert parse_size("128KiB") == 128 << 10
    with pytest.raises(ValueError):
        parse_size("12 parsecs")


def test_image_users_resolve_through_the_image_files(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n")
    (tmp_path / "etc" / "group").write_text("root:x:0:\napp:x:1001:\nstaff:x:50:app,other\n")
    assert resolve_user(tmp_path, "") == ProcessUser(0, 0, (0,), "/")
    assert resolve_user(tmp_path, "app") == ProcessUser(1000, 1001, (50, 1001), "/home/app")
    assert resolve_user(tmp_path, "1000:staff") == ProcessUser(1000, 50, (50,), "/home/app")
    assert resolve_user(tmp_path, "4242:4343") == ProcessUser(4242, 4343, (4343,), "/")
    with pytest.raises(InvalidRequest):
        resolve_user(tmp_path, "nobody-here")
