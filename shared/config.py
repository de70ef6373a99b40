"""Typed configuration: one pydantic-settings class per service, from a YAML file plus ``DAMSELFLY_*``.

Precedence, highest first: values passed in code, environment variables (``DAMSELFLY_PORT``,
``DAMSELFLY_NATS__URL`` with ``__`` between nested keys), the YAML file, the defaults. An unknown key
or a value of the wrong type is a :class:`~shared.errors.ConfigError` whose one-line message names the
key, so a service refuses to start rather than silently ignoring a typo.
"""

from __future__ import annotations

import contextvars
import os
import socket
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from shared.errors import ConfigError

ENV_PREFIX = "DAMSELFLY_"

# The YAML document being loaded; a context variable so concurrent loads in one process (tests start
# several services in-process) never see each other's file.
_yaml_document: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "damselfly_yaml_document", default=None
)


class StrictModel(BaseModel):
    """A nested config block: unknown keys are errors, as at the top level."""

    model_config = ConfigDict(extra="forbid")


class NatsSettings(StrictModel):
    """How a service reaches NATS JetStream and how it declares its streams."""

    url: str = Field("nats://127.0.0.1:4222", description="Server URL(s), comma-separated for a cluster.")
    connect_timeout: float = Field(2.0, gt=0, description="Seconds to wait for the first connection.")
    request_timeout: float = Field(5.0, gt=0, description="Seconds to wait for a JetStream API or request reply.")
    replicas: int = Field(1, ge=1, le=5, description="Stream replicas (3 on a NATS cluster).")
    stream_max_age_seconds: float = Field(7 * 24 * 3600, gt=0, description="Event streams keep messages this long.")
    stream_max_bytes: int = Field(-1, description="Byte limit per event stream; -1 for none.")

    @property
    def servers(self) -> list[str]:
        """The server URLs as a list."""
        return [part.strip() for part in self.url.split(",") if part.strip()]


class TelemetrySettings(StrictModel):
    """Logs and traces."""

    log_level: str = Field("INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")
    json_logs: bool = True
    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP endpoint; defaults to the OTEL_EXPORTER_OTLP_ENDPOINT variable."
    )
    access_log: bool = False


def default_workdir() -> Path:
    """Where state lives when no workdir is configured."""
    import platformdirs

    return Path(platformdirs.user_data_dir("damselfly"))


class _YamlDocumentSource(PydanticBaseSettingsSource):
    """Feeds the YAML document of the current load into pydantic-settings, below the environment."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        document = _yaml_document.get() or {}
        return document.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_yaml_document.get() or {})


class ServiceConfig(BaseSettings):
    """Settings every service shares; each service subclasses it with its own block."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    service: ClassVar[str] = "service"
    default_port: ClassVar[int] = 0

    host: str = Field("127.0.0.1", description="Address the HTTP server binds.")
    port: int = Field(-1, ge=-1, le=65535, description="HTTP port; -1 for the service's default, 0 for any free.")
    node_name: str = Field(default_factory=socket.gethostname, min_length=1, description="This node's name.")
    workdir: Path = Field(default_factory=default_workdir, description="Directory for all of this service's state.")
    nats: NatsSettings = Field(default_factory=lambda: NatsSettings.model_validate({}))
    telemetry: TelemetrySettings = Field(default_factory=lambda: TelemetrySettings.model_validate({}))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlDocumentSource(settings_cls))

    @property
    def bind_port(self) -> int:
        """The port to bind: the configured one, or the service's default when left at -1."""
        return self.default_port if self.port == -1 else self.port

    @property
    def service_workdir(self) -> Path:
        """This service's own directory under the workdir."""
        return self.workdir / self.service


ConfigT = TypeVar("ConfigT", bound=ServiceConfig)


def _key_of(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "<root>"


def describe_validation_error(exc: ValidationError, source: str) -> str:
    """One line naming every bad key: 'unknown key' or 'wrong value' with what was expected."""
    problems = []
    for error in exc.errors():
        key = _key_of(error["loc"])
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown key '{key}'")
        elif error["type"] == "missing":
            problems.append(f"missing key '{key}'")
        else:
            problems.append(f"invalid value for '{key}': {error['msg']} (got {error.get('input')!r})")
    return f"config error in {source}: " + "; ".join(problems)


def read_yaml_document(path: Path) -> dict[str, Any]:
    """Parse a YAML config file into a mapping, or raise ConfigError saying why not."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"config error: cannot read {path}: {exc.strerror}") from exc
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else "syntax error"
        raise ConfigError(f"config error in {path}: not valid YAML: {first_line}") from exc
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"config error in {path}: the top level must be a mapping, not {type(document).__name__}")
    return document


def load_config(config_cls: type[ConfigT], path: Path | None = None, **overrides: Any) -> ConfigT:
    """Build ``config_cls`` from the YAML file at ``path`` (optional), the environment and ``overrides``."""
    document = read_yaml_document(path) if path is not None else {}
    env_keys = sorted(key for key in os.environ if key.startswith(ENV_PREFIX))
    source = str(path) if path is not None else "defaults"
    if env_keys:
        source += " + environment"
    token = _yaml_document.set(document)
    try:
        return config_cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source)) from exc
    finally:
        _yaml_document.reset(token)


def dump_config(config: ServiceConfig) -> dict[str, Any]:
    """The config as a YAML-ready mapping (paths as strings), e.g. for `damselfly up` to hand to a child."""
    return config.model_dump(mode="json")
