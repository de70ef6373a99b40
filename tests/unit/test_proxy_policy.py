"""The registry-proxy's routing rules: origin choice, allow-list, P2P rules."""

from __future__ import annotations

import pytest

from services.registry_proxy.config import ProxyRule, RegistryMirror, RegistryProxyConfig
from services.registry_proxy.origins import ProxyPolicy
from shared.errors import Forbidden
from shared.registry_client import BearerChallenge


def policy(**values: object) -> ProxyPolicy:
    settings: dict[str, object] = {
        "registry_mirror": RegistryMirror(url="http://127.0.0.1:5000"),
        "allowed_registries": ["https://ghcr.io", "https://index.docker.io"],
    }
    settings.update(values)
    config = RegistryProxyConfig(**settings)  # type: ignore[arg-type]
    return ProxyPolicy.from_config(config)


def test_origin_comes_from_the_header_then_ns_then_the_mirror_url() -> None:
    rules = policy()
    assert rules.origin_for("https://ghcr.io", "docker.io") == "https://ghcr.io"
    assert rules.origin_for(None, "docker.io") == "https://index.docker.io"
    assert rules.origin_for(None, "127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert rules.origin_for(None, None) == "http://127.0.0.1:5000"


@pytest.mark.parametrize(
    "header", ["https://evil.example.com", "http://ghcr.io", "ftp://ghcr.io", "https://ghcr.io:444"]
)
def test_origins_off_the_allow_list_are_forbidden(header: str) -> None:
    with pytest.raises(Forbidden):
        policy().origin_for(header, None)


def test_without_dynamic_the_header_is_ignored() -> None:
    rules = policy(registry_mirror=RegistryMirror(url="http://127.0.0.1:5000", dynamic=False))
    assert rules.origin_for("https://evil.example.com", "evil.example.com") == "http://127.0.0.1:5000"


def test_p2p_rules_and_direct_rules() -> None:
    rules = policy(proxies=[ProxyRule(regx="blobs/sha256.*"), ProxyRule(regx="blobs/sha256:00", direct=True)])
    assert rules.goes_p2p("/v2/library/python/blobs/sha256:ab")
    assert not rules.goes_p2p("/v2/library/python/blobs/sha256:00ff")
    assert not rules.goes_p2p("/v2/library/python/manifests/3.11")


def test_bearer_challenge_parsing() -> None:
    challenge = BearerChallenge.parse(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/python:pull"'
    )
    assert challenge == BearerChallenge(
        realm="https://auth.docker.io/token", service="registry.docker.io", scope="repository:library/python:pull"
    )
    assert BearerChallenge.parse('Basic realm="x"') is None
    assert BearerChallenge.parse(None) is None


def test_blob_checks_are_kept_per_credentials_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.registry_proxy import api

    now = [100.0]
    monkeypatch.setattr(api.time, "monotonic", lambda: now[0])
    checks = api.BlobChecks(ttl=30.0, capacity=2)
    url = "http://o/v2/a/blobs/sha256:" + "a" * 64
    assert checks.get(url, None) == (False, None)
    checks.put(url, "Bearer x", 1234)
    assert checks.get(url, "Bearer x") == (True, 1234)
    assert checks.get(url, None) == (False, None)  # Other credentials: the origin is asked again.
    now[0] += 31
    assert checks.get(url, "Bearer x") == (False, None)  # Too old.
    for index in range(3):
        checks.put(f"{url}{index}", None, index)
    assert checks.get(f"{url}0", None) == (False, None)  # The oldest went first.
    assert checks.get(f"{url}2", None) == (True, 2)
    disabled = api.BlobChecks(ttl=0)
    disabled.put(url, None, 1)
    assert disabled.get(url, None) == (False, None)
