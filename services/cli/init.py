"""``damselfly init containerd|skopeo``: point this node's container tools at its proxy, like Dragonfly's dfinit.

containerd gets one ``<config-path>/<host>/hosts.toml`` per registry: the node's registry-proxy as the first
host to try, with the ``X-Dragonfly-Registry`` header that tells the proxy which origin the request is for
(containerd falls back to the registry itself when the proxy fails). skopeo and podman get a mirror entry in
``containers-registries.conf(5)``; they cannot send headers, so the proxy sends their requests to its own
``registry_mirror.url``: one origin per proxy.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.text import Text

from services.registry_proxy.origins import REGISTRY_HEADER
from shared.errors import ConfigError, DamselflyError, InvalidRequest

init_app = typer.Typer(help="Point this node's container tools at its Damselfly proxy.", no_args_is_help=True)

err = Console(stderr=True)

DEFAULT_PROXY = "http://127.0.0.1:65001"
DEFAULT_REGISTRY = "https://index.docker.io"
# containerd names Docker Hub "docker.io" (its hosts directory) and reaches its API at registry-1; the
# proxy's name for it is index.docker.io (its default registry_mirror.url).
_DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_DOCKER_HUB_SERVER = "https://registry-1.docker.io"
_DOCKER_HUB_ORIGIN = "https://index.docker.io"


@dataclass(frozen=True)
class Registry:
    """An origin registry as the container tools and the proxy name it."""

    origin: str  # scheme://host[:port], what the proxy's allow-list holds (the X-Dragonfly-Registry value).
    host: str  # containerd's hosts directory and the registries.conf prefix: host[:port], docker.io for Hub.
    server: str  # containerd's `server`: where it falls back to when the proxy fails.

    @property
    def insecure(self) -> bool:
        """Plain HTTP."""
        return self.origin.startswith("http://")


@dataclass(frozen=True)
class Proxy:
    """The node's registry-proxy."""

    url: str  # scheme://host:port
    host: str  # host:port, how registries.conf names a mirror

    @property
    def insecure(self) -> bool:
        """Plain HTTP."""
        return self.url.startswith("http://")


@dataclass(frozen=True)
class PlannedFile:
    """A file an init command writes: its new content and what writing it does."""

    path: Path
    content: str
    action: str  # "create", "update" (entries added), "replace" (something overwritten) or "unchanged"

    @property
    def needs_force(self) -> bool:
        """Whether writing it overwrites something the user had."""
        return self.action == "replace"


def _base_url(value: str, what: str) -> tuple[str, str, str]:
    """``(scheme, netloc, hostname)`` of an ``http(s)://host[:port]`` URL; InvalidRequest saying why not."""
    example = "e.g. http://127.0.0.1:5000 or https://index.docker.io"
    text = value.strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidRequest(f"{what} {value!r} is not an http:// or https:// URL ({example})")
    try:
        port = parts.port
    except ValueError as exc:
        raise InvalidRequest(f"{what} {value!r} has an invalid port") from exc
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise InvalidRequest(f"{what} {value!r} must be scheme://host[:port], without credentials ({example})")
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise InvalidRequest(f"{what} {value!r} must be scheme://host[:port], without a path or query ({example})")
    if port == 0:
        raise InvalidRequest(f"{what} {value!r} has an invalid port")
    return parts.scheme, parts.netloc.lower(), parts.hostname.lower()


def parse_registry(value: str) -> Registry:
    """A ``--registry`` URL; Docker Hub under any of its names becomes containerd's ``docker.io``."""
    scheme, netloc, hostname = _base_url(value, "registry")
    if hostname in _DOCKER_HUB_HOSTS and netloc == hostname:
        if scheme != "https":
            raise InvalidRequest(f"registry {value!r}: Docker Hub is served over https only")
        return Registry(origin=_DOCKER_HUB_ORIGIN, host="docker.io", server=_DOCKER_HUB_SERVER)
    origin = f"{scheme}://{netloc}"
    return Registry(origin=origin, host=netloc, server=origin)


def parse_registries(values: Iterable[str]) -> list[Registry]:
    """Every ``--registry``, de-duplicated; two URLs for one host (http and https) are an error."""
    registries: dict[str, Registry] = {}
    for value in values:
        registry = parse_registry(value)
        known = registries.get(registry.host)
        if known is not None and known != registry:
            raise InvalidRequest(f"registries {known.origin} and {registry.origin} both name host {registry.host}")
        registries[registry.host] = registry
    if not registries:
        raise InvalidRequest("give at least one --registry")
    return list(registries.values())


def parse_proxy(value: str) -> Proxy:
    """The ``--proxy`` URL; the port is made explicit (registries.conf names mirrors host:port)."""
    scheme, netloc, hostname = _base_url(value, "proxy")
    port = urlsplit(f"{scheme}://{netloc}").port or (443 if scheme == "https" else 80)
    host = f"[{hostname}]:{port}" if ":" in hostname else f"{hostname}:{port}"
    return Proxy(url=f"{scheme}://{host}", host=host)


# --- TOML ------------------------------------------------------------------------------------------

_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(value: str) -> str:
    escaped = []
    for char in value:
        if char in _TOML_ESCAPES:
            escaped.append(_TOML_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def _toml_key(key: str) -> str:
    # fullmatch: "$" would also match before a trailing newline, and "a\n" is no bare key.
    return key if _BARE_KEY_RE.fullmatch(key) else _toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def _write_table(lines: list[str], table: dict[str, Any], path: list[str]) -> None:
    # Plain keys first: once a [header] is written, later keys would belong to that table.
    for key, value in table.items():
        if not isinstance(value, dict) and not _is_table_array(value):
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in table.items():
        header = ".".join(_toml_key(part) for part in [*path, key])
        if isinstance(value, dict):
            has_keys = any(not isinstance(v, dict) and not _is_table_array(v) for v in value.values())
            if has_keys or not value:  # A table of tables only is declared by its sub-tables' headers.
                lines.extend(["", f"[{header}]"])
            _write_table(lines, value, [*path, key])
        elif _is_table_array(value):
            for item in value:
                lines.extend(["", f"[[{header}]]"])
                _write_table(lines, item, [*path, key])


def dump_toml(document: dict[str, Any]) -> str:
    """A TOML document (what ``tomllib`` reads back as ``document``); comments are not kept."""
    lines: list[str] = []
    _write_table(lines, document, [])
    return "\n".join(lines).lstrip("\n") + "\n"


# --- containerd ------------------------------------------------------------------------------------


def containerd_hosts_toml(registry: Registry, proxy: Proxy) -> str:
    """containerd's hosts.toml for ``registry``: pull and resolve through ``proxy``, then the registry."""
    return dump_toml(
        {
            "server": registry.server,
            "host": {
                proxy.url: {
                    "capabilities": ["pull", "resolve"],
                    # The proxy forwards to this origin (it must be on the proxy's allow-list).
                    "header": {REGISTRY_HEADER: [registry.origin]},
                }
            },
        }
    )


def _planned(path: Path, content: str, changed_action: str) -> PlannedFile:
    try:
        current = path.read_text()
    except FileNotFoundError:
        return PlannedFile(path, content, "create")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    return PlannedFile(path, content, "unchanged" if current == content else changed_action)


def plan_containerd(config_path: Path, registries: Sequence[Registry], proxy: Proxy) -> list[PlannedFile]:
    """The hosts.toml files for every registry under containerd's ``config_path`` (its certs.d)."""
    if config_path.exists() and not config_path.is_dir():
        raise InvalidRequest(f"--config-path {config_path} is not a directory")
    return [
        _planned(config_path / registry.host / "hosts.toml", containerd_hosts_toml(registry, proxy), "replace")
        for registry in registries
    ]


# --- skopeo / podman (containers-registries.conf) ---------------------------------------------------


def registries_conf_entry(registry: Registry, proxy: Proxy) -> dict[str, Any]:
    """The ``[[registry]]`` entry that sends pulls of ``registry`` to ``proxy`` first."""
    entry: dict[str, Any] = {"prefix": registry.host, "location": registry.host}
    if registry.insecure:
        entry["insecure"] = True
    mirror: dict[str, Any] = {"location": proxy.host}
    if proxy.insecure:
        mirror["insecure"] = True
    entry["mirror"] = [mirror]
    return entry


def _prefix_of(entry: dict[str, Any]) -> str | None:
    prefix = entry.get("prefix") or entry.get("location")
    return prefix if isinstance(prefix, str) else None


def merge_registries_conf(
    document: dict[str, Any], registries: Sequence[Registry], proxy: Proxy
) -> tuple[dict[str, Any], list[str], list[str]]:
    """``(merged document, prefixes added, prefixes replaced)``: one entry per registry; others kept."""
    if "registries" in document:
        raise ConfigError("the file is in the V1 format ([registries.search] ...): convert it to V2 first")
    entries = document.get("registry", [])
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ConfigError("its `registry` key is not an array of [[registry]] tables")
    merged = [dict(entry) for entry in entries]
    added, replaced = [], []
    for registry in registries:
        wanted = registries_conf_entry(registry, proxy)
        index = next((i for i, entry in enumerate(merged) if _prefix_of(entry) == registry.host), None)
        if index is None:
            merged.append(wanted)
            added.append(registry.host)
        elif merged[index] != wanted:
            merged[index] = wanted
            replaced.append(registry.host)
    return {**document, "registry": merged}, added, replaced


def plan_skopeo(config_path: Path, registries: Sequence[Registry], proxy: Proxy) -> PlannedFile:
    """``config_path`` with a mirror entry for every registry, every other setting and entry kept."""
    if config_path.is_dir():
        raise InvalidRequest(f"--config-path {config_path} is a directory, not a registries.conf file")
    try:
        current = config_path.read_text()
    except FileNotFoundError:
        current = None
    except OSError as exc:
        raise ConfigError(f"cannot read {config_path}: {exc.strerror}") from exc
    try:
        document = tomllib.loads(current or "")
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{config_path} is not valid TOML: {exc}") from exc
    try:
        merged, added, replaced = merge_registries_conf(document, registries, proxy)
    except ConfigError as exc:
        raise ConfigError(f"{config_path}: {exc.message}") from exc
    if current is None:
        return PlannedFile(config_path, dump_toml(merged), "create")
    if replaced:
        return PlannedFile(config_path, dump_toml(merged), "replace")
    if not added:
        return PlannedFile(config_path, current, "unchanged")
    if not current.strip():
        return PlannedFile(config_path, dump_toml(merged), "update")
    # Only new entries: append them, so the user's comments and layout survive (a replaced entry means
    # rewriting the whole file, which keeps every setting but not the comments).
    new_entries = {"registry": [entry for entry in merged["registry"] if _prefix_of(entry) in added]}
    content = current.rstrip("\n") + "\n\n" + dump_toml(new_entries)
    try:
        appended_ok = tomllib.loads(content) == merged
    except tomllib.TOMLDecodeError:  # E.g. `registry = [...]` written inline cannot be extended by tables.
        appended_ok = False
    return PlannedFile(config_path, content if appended_ok else dump_toml(merged), "update")


# --- writing and the commands -------------------------------------------------------------------------


def _write_atomically(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(content)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def apply(files: Sequence[PlannedFile], *, force: bool, dry_run: bool) -> None:
    """Write every changed file, or none: a file that would be overwritten needs ``force``."""
    blocked = [str(file.path) for file in files if file.needs_force]
    if blocked and not force and not dry_run:
        raise ConfigError(f"{', '.join(blocked)} already exists with other settings; pass --force to replace it")
    if dry_run:
        return
    for file in files:
        if file.action != "unchanged":
            try:
                _write_atomically(file.path, file.content)
            except OSError as exc:
                raise ConfigError(f"cannot write {file.path}: {exc.strerror}") from exc


def _report(files: Sequence[PlannedFile], *, dry_run: bool, output_json: bool) -> None:
    if output_json:
        rows = [{"path": str(f.path), "action": f.action, "content": f.content, "dry_run": dry_run} for f in files]
        typer.echo(json.dumps(rows, indent=2))
        return
    for file in files:
        verb = {"create": "created", "update": "updated", "replace": "replaced", "unchanged": "unchanged"}[file.action]
        if dry_run and file.action != "unchanged":
            verb = f"would be {verb}"
        typer.echo(f"# {file.path} ({verb})")
        typer.echo(file.content, nl=False)


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
    return typer.Exit(code)


def _run(plan: Callable[[], list[PlannedFile]], *, force: bool, dry_run: bool, output_json: bool) -> None:
    try:
        files = plan()
        apply(files, force=force, dry_run=dry_run)
    except InvalidRequest as exc:
        raise _fail(exc.message, code=2) from exc
    except DamselflyError as exc:
        raise _fail(exc.message) from exc
    _report(files, dry_run=dry_run, output_json=output_json)


ProxyOpt = Annotated[
    str,
    typer.Option("--proxy", envvar="DAMSELFLY_NODE", help="This node's registry-proxy (scheme://host:port)."),
]
RegistryOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--registry",
        help="An origin registry to pull through the proxy (scheme://host[:port]); repeat for several.",
        show_default=DEFAULT_REGISTRY,
    ),
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print what would be written; write nothing.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace existing settings for these registries.")]
JsonOpt = Annotated[bool, typer.Option("--output-json", help="Print the files as JSON.")]

CONTAINERD_EPILOG = (
    "containerd reads these files when its CRI registry config_path is the --config-path "
    '(\\[plugins."io.containerd.grpc.v1.cri".registry] config_path = "/etc/containerd/certs.d"); '
    "ctr reads them with --hosts-dir.\n\n"
    "Examples:\n\n"
    "  damselfly init containerd\n\n"
    "  damselfly init containerd --proxy http://127.0.0.1:65001 --registry https://index.docker.io "
    "--registry http://127.0.0.1:5000\n\n"
    "  damselfly init containerd --config-path ./hosts --dry-run\n\n"
    "  ctr images pull --hosts-dir ./hosts 127.0.0.1:5000/library/python:3.11"
)
SKOPEO_EPILOG = (
    "skopeo and podman cannot send headers: the proxy answers their requests from its registry_mirror.url, "
    "so give the one registry that is the proxy's registry_mirror.url.\n\n"
    "Examples:\n\n"
    "  damselfly init skopeo --registry http://127.0.0.1:5000\n\n"
    "  damselfly init skopeo --registry http://127.0.0.1:5000 --config-path ./registries.conf --dry-run\n\n"
    "  skopeo --registries-conf ./registries.conf copy docker://127.0.0.1:5000/library/python:3.11 oci:py:3.11"
)


@init_app.command("containerd", epilog=CONTAINERD_EPILOG)
def init_containerd(
    proxy: ProxyOpt = DEFAULT_PROXY,
    registry: RegistryOpt = None,
    config_path: Annotated[
        Path, typer.Option("--config-path", help="containerd's hosts directory (its registry config_path).")
    ] = Path("/etc/containerd/certs.d"),
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
    output_json: JsonOpt = False,
) -> None:
    """Write <config-path>/<registry host>/hosts.toml so containerd pulls each registry through the proxy."""

    def plan() -> list[PlannedFile]:
        return plan_containerd(config_path, parse_registries(registry or [DEFAULT_REGISTRY]), parse_proxy(proxy))

    _run(plan, force=force, dry_run=dry_run, output_json=output_json)


@init_app.command("skopeo", epilog=SKOPEO_EPILOG)
def init_skopeo(
    proxy: ProxyOpt = DEFAULT_PROXY,
    registry: RegistryOpt = None,
    config_path: Annotated[
        Path, typer.Option("--config-path", help="The containers-registries.conf(5) file to merge into.")
    ] = Path("/etc/containers/registries.conf"),
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
    output_json: JsonOpt = False,
) -> None:
    """Add a [[registry]] entry with the proxy as its mirror to registries.conf for skopeo and podman."""

    def plan() -> list[PlannedFile]:
        registries = parse_registries(registry or [DEFAULT_REGISTRY])
        if len(registries) > 1:
            # Without a header the proxy would answer for every registry from its one default origin.
            raise InvalidRequest(
                "skopeo cannot tell the proxy which registry a request is for, so the proxy answers from its "
                "registry_mirror.url: give one --registry (that one); run this once per proxy and registry"
            )
        return [plan_skopeo(config_path, registries, parse_proxy(proxy))]

    _run(plan, force=force, dry_run=dry_run, output_json=output_json)
