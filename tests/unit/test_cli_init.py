"""`damselfly init containerd|skopeo`: the files they write, merging, --force, --dry-run and bad input."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner, Result

from services.cli.init import dump_toml, parse_proxy, parse_registry
from services.cli.main import app
from services.registry_proxy.config import RegistryProxyConfig
from services.registry_proxy.origins import REGISTRY_HEADER, ProxyPolicy

PROXY = "http://127.0.0.1:65001"


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, ["init", *args], env={"DAMSELFLY_NODE": None})


def hosts_toml(config_path: Path, host: str) -> dict[str, object]:
    return tomllib.loads((config_path / host / "hosts.toml").read_text())


# --- containerd --------------------------------------------------------------------------------------


def test_containerd_writes_one_hosts_toml_per_registry_with_the_proxy_and_its_origin_header(tmp_path: Path) -> None:
    hosts = tmp_path / "certs.d"
    result = invoke(
        "containerd",
        "--proxy",
        PROXY,
        "--registry",
        "https://index.docker.io",
        "--registry",
        "http://127.0.0.1:5000",
        "--config-path",
        str(hosts),
    )
    assert result.exit_code == 0, result.output
    assert sorted(path.relative_to(hosts).as_posix() for path in hosts.rglob("*.toml")) == [
        "127.0.0.1:5000/hosts.toml",
        "docker.io/hosts.toml",
    ]
    assert hosts_toml(hosts, "docker.io") == {
        "server": "https://registry-1.docker.io",
        "host": {
            PROXY: {"capabilities": ["pull", "resolve"], "header": {REGISTRY_HEADER: ["https://index.docker.io"]}}
        },
    }
    assert hosts_toml(hosts, "127.0.0.1:5000") == {
        "server": "http://127.0.0.1:5000",
        "host": {PROXY: {"capabilities": ["pull", "resolve"], "header": {REGISTRY_HEADER: ["http://127.0.0.1:5000"]}}},
    }
    # It prints what it wrote.
    assert f"# {hosts / 'docker.io' / 'hosts.toml'} (created)" in result.stdout
    assert 'server = "https://registry-1.docker.io"' in result.stdout


def test_the_header_containerd_sends_selects_that_origin_on_a_proxy_whose_default_is_elsewhere(
    tmp_path: Path,
) -> None:
    # What the proxy does with the header value the helper writes (the allow-list has both origins).
    config = RegistryProxyConfig(
        workdir=tmp_path,
        registry_mirror={"url": "http://127.0.0.1:1"},
        allowed_registries=["https://index.docker.io", "http://127.0.0.1:5000"],
    )
    policy = ProxyPolicy.from_config(config)
    expected = {
        "https://index.docker.io": "https://index.docker.io",
        "https://docker.io": "https://index.docker.io",
        "https://registry-1.docker.io": "https://index.docker.io",
        "http://127.0.0.1:5000/": "http://127.0.0.1:5000",
    }
    for url, origin in expected.items():
        assert policy.origin_for(parse_registry(url).origin, None) == origin


def test_containerd_defaults_to_docker_hub(tmp_path: Path) -> None:
    result = invoke("containerd", "--config-path", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert hosts_toml(tmp_path, "docker.io")["server"] == "https://registry-1.docker.io"


def test_containerd_dry_run_prints_and_writes_nothing(tmp_path: Path) -> None:
    result = invoke(
        "containerd", "--registry", "http://127.0.0.1:5000", "--config-path", str(tmp_path / "h"), "--dry-run"
    )
    assert result.exit_code == 0, result.output
    assert "(would be created)" in result.stdout
    assert '[host."http://127.0.0.1:65001"]' in result.stdout
    assert not (tmp_path / "h").exists()


def test_containerd_replaces_a_different_file_only_with_force(tmp_path: Path) -> None:
    target = tmp_path / "127.0.0.1:5000" / "hosts.toml"
    target.parent.mkdir()
    target.write_text('server = "http://127.0.0.1:5000"\n')
    args = ("containerd", "--registry", "http://127.0.0.1:5000", "--config-path", str(tmp_path))
    refused = invoke(*args)
    assert refused.exit_code == 1
    assert "already exists" in refused.stderr and "--force" in refused.stderr and str(target) in refused.stderr
    assert target.read_text() == 'server = "http://127.0.0.1:5000"\n'

    dry = invoke(*args, "--dry-run")
    assert dry.exit_code == 0 and "(would be replaced)" in dry.stdout
    assert target.read_text() == 'server = "http://127.0.0.1:5000"\n'

    forced = invoke(*args, "--force")
    assert forced.exit_code == 0, forced.output
    assert "(replaced)" in forced.stdout
    assert PROXY in hosts_toml(tmp_path, "127.0.0.1:5000")["host"]  # type: ignore[operator]

    # Running it again changes nothing and needs no --force.
    again = invoke(*args)
    assert again.exit_code == 0 and "(unchanged)" in again.stdout


def test_a_refused_file_stops_every_write(tmp_path: Path) -> None:
    (tmp_path / "docker.io").mkdir()
    (tmp_path / "docker.io" / "hosts.toml").write_text("# mine\n")
    result = invoke(
        "containerd",
        "--registry",
        "http://127.0.0.1:5000",
        "--registry",
        "https://docker.io",
        "--config-path",
        str(tmp_path),
    )
    assert result.exit_code == 1
    assert not (tmp_path / "127.0.0.1:5000").exists()


def test_containerd_output_json(tmp_path: Path) -> None:
    result = invoke(
        "containerd", "--registry", "http://r.example:5000", "--config-path", str(tmp_path), "--output-json"
    )
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    assert row["path"] == str(tmp_path / "r.example:5000" / "hosts.toml")
    assert row["action"] == "create" and row["dry_run"] is False
    assert tomllib.loads(row["content"])["server"] == "http://r.example:5000"


def test_an_https_proxy_keeps_its_scheme(tmp_path: Path) -> None:
    result = invoke("containerd", "--proxy", "https://node.example:8443/", "--config-path", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert list(hosts_toml(tmp_path, "docker.io")["host"]) == ["https://node.example:8443"]  # type: ignore[call-overload]


# --- skopeo ------------------------------------------------------------------------------------------


def test_skopeo_writes_a_mirror_entry(tmp_path: Path) -> None:
    conf = tmp_path / "registries.conf"
    result = invoke("skopeo", "--proxy", PROXY, "--registry", "http://127.0.0.1:5000", "--config-path", str(conf))
    assert result.exit_code == 0, result.output
    assert tomllib.loads(conf.read_text()) == {
        "registry": [
            {
                "prefix": "127.0.0.1:5000",
                "location": "127.0.0.1:5000",
                "insecure": True,
                "mirror": [{"location": "127.0.0.1:65001", "insecure": True}],
            }
        ]
    }


def test_skopeo_docker_hub_and_an_https_proxy_are_not_insecure(tmp_path: Path) -> None:
    conf = tmp_path / "registries.conf"
    result = invoke("skopeo", "--proxy", "https://node.example", "--config-path", str(conf))
    assert result.exit_code == 0, result.output
    assert tomllib.loads(conf.read_text())["registry"] == [
        {"prefix": "docker.io", "location": "docker.io", "mirror": [{"location": "node.example:443"}]}
    ]


EXISTING_CONF = """\
# Site settings: keep this comment.
unqualified-search-registries = ["docker.io", "quay.io"]
short-name-mode = "enforcing"

[[registry]]
prefix = "quay.io"
location = "quay.io"
blocked = false

[[registry.mirror]]
location = "quay-mirror.example:5000"

[aliases]
"myapp" = "quay.io/me/myapp"
"""


def test_skopeo_merges_into_an_existing_file_and_keeps_everything_else(tmp_path: Path) -> None:
    conf = tmp_path / "registries.conf"
    conf.write_text(EXISTING_CONF)
    result = invoke("skopeo", "--registry", "http://127.0.0.1:5000", "--config-path", str(conf))
    assert result.exit_code == 0, result.output
    assert "(updated)" in result.stdout
    text = conf.read_text()
    assert text.startswith(EXISTING_CONF)  # Appended: comments and layout survive.
    merged = tomllib.loads(text)
    original = tomllib.loads(EXISTING_CONF)
    assert merged["registry"][0] == original["registry"][0]
    assert merged["registry"][1]["prefix"] == "127.0.0.1:5000"
    assert merged["aliases"] == original["aliases"]
    assert merged["unqualified-search-registries"] == ["docker.io", "quay.io"]
    assert merged["short-name-mode"] == "enforcing"

    again = invoke("skopeo", "--registry", "http://127.0.0.1:5000", "--config-path", str(conf))
    assert again.exit_code == 0 and "(unchanged)" in again.stdout
    assert conf.read_text() == text


def test_skopeo_replaces_a_conflicting_entry_only_with_force(tmp_path: Path) -> None:
    conf = tmp_path / "registries.conf"
    conf.write_text(EXISTING_CONF + '\n[[registry]]\nprefix = "127.0.0.1:5000"\nlocation = "127.0.0.1:5000"\n')
    before = conf.read_text()
    args = ("skopeo", "--registry", "http://127.0.0.1:5000", "--config-path", str(conf))
    refused = invoke(*args)
    assert refused.exit_code == 1 and "--force" in refused.stderr
    assert conf.read_text() == before

    forced = invoke(*args, "--force")
    assert forced.exit_code == 0, forced.output
    merged = tomllib.loads(conf.read_text())
    assert [entry["prefix"] for entry in merged["registry"]] == ["quay.io", "127.0.0.1:5000"]
    assert merged["registry"][1]["mirror"] == [{"location": "127.0.0.1:65001", "insecure": True}]
    assert merged["registry"][0] == tomllib.loads(EXISTING_CONF)["registry"][0]
    assert merged["aliases"] == {"myapp": "quay.io/me/myapp"}


def test_skopeo_dry_run_writes_nothing(tmp_path: Path) -> None:
    conf = tmp_path / "registries.conf"
    conf.write_text(EXISTING_CONF)
    result = invoke("skopeo", "--registry", "http://127.0.0.1:5000", "--config-path", str(conf), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "(would be updated)" in result.stdout and 'location = "127.0.0.1:65001"' in result.stdout
    assert conf.read_text() == EXISTING_CONF


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[[registry]\n", "not valid TOML"),
        ('[registries.search]\nregistries = ["docker.io"]\n', "V1 format"),
        ('registry = "docker.io"\n', "not an array"),
    ],
)
def test_skopeo_refuses_a_file_it_cannot_merge(tmp_path: Path, content: str, message: str) -> None:
    conf = tmp_path / "registries.conf"
    conf.write_text(content)
    result = invoke("skopeo", "--registry", "http://127.0.0.1:5000", "--config-path", str(conf), "--force")
    assert result.exit_code == 1
    assert message in result.stderr
    assert conf.read_text() == content


def test_skopeo_takes_one_registry_because_it_cannot_name_the_origin(tmp_path: Path) -> None:
    result = invoke(
        "skopeo",
        "--registry",
        "http://a:5000",
        "--registry",
        "http://b:5000",
        "--config-path",
        str(tmp_path / "r.conf"),
    )
    assert result.exit_code == 2
    assert "registry_mirror.url" in result.stderr
    assert not (tmp_path / "r.conf").exists()


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("--proxy", "127.0.0.1:65001"),
        ("--proxy", "ftp://127.0.0.1:65001"),
        ("--proxy", "http://127.0.0.1:65001/v2/"),
        ("--proxy", "http://127.0.0.1:99999"),
        ("--proxy", "http://user:pw@127.0.0.1:65001"),
        ("--registry", "docker.io"),
        ("--registry", "http://docker.io"),
        ("--registry", "https://r.example/ns?x=1"),
        ("--registry", "http://r.example:5000", "--registry", "https://r.example:5000"),
    ],
)
@pytest.mark.parametrize("tool", ["containerd", "skopeo"])
def test_bad_urls_are_rejected_with_exit_2_and_nothing_written(
    tmp_path: Path, tool: str, args: tuple[str, ...]
) -> None:
    target = tmp_path / "out"
    result = invoke(tool, *args, "--config-path", str(target))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ")
    assert not target.exists()


def test_a_config_path_of_the_wrong_kind_is_rejected(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert invoke("containerd", "--config-path", str(a_file)).exit_code == 2
    assert invoke("skopeo", "--config-path", str(tmp_path)).exit_code == 2


def test_an_unwritable_config_path_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")  # A file where a parent directory should be: not even root can write below it.
    result = invoke("skopeo", "--config-path", str(blocker / "registries.conf"))
    assert result.exit_code == 1
    assert "cannot" in result.stderr and str(blocker) in result.stderr


def test_proxy_urls_are_normalised() -> None:
    assert parse_proxy("HTTP://Node.Example:65001/").url == "http://node.example:65001"
    assert parse_proxy("http://[::1]:65001").host == "[::1]:65001"
    assert parse_proxy("https://node.example").host == "node.example:443"


# --- the TOML writer ---------------------------------------------------------------------------------

_keys = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=8)
_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20),
)
_values = st.recursive(
    _scalars | st.lists(_scalars, max_size=3),
    lambda inner: (
        st.dictionaries(_keys, inner, max_size=3) | st.lists(st.dictionaries(_keys, inner, max_size=3), max_size=3)
    ),
    max_leaves=12,
)


@given(st.dictionaries(_keys, _values, max_size=4))
def test_dump_toml_round_trips_through_tomllib(document: dict[str, object]) -> None:
    assert tomllib.loads(dump_toml(document)) == document


def test_skopeo_rewrites_a_file_it_cannot_append_to_and_keeps_its_entries(tmp_path: Path) -> None:
    conf = tmp_path / "registries.conf"
    # An inline array of tables cannot be extended by a [[registry]] header: the file is rewritten.
    conf.write_text('registry = [{prefix = "quay.io", location = "quay.io"}]\n')
    result = invoke("skopeo", "--registry", "http://127.0.0.1:5000", "--config-path", str(conf))
    assert result.exit_code == 0, result.output
    merged = tomllib.loads(conf.read_text())
    assert [entry["prefix"] for entry in merged["registry"]] == ["quay.io", "127.0.0.1:5000"]
