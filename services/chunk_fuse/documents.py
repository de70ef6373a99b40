"""Reading a mount config file into a plain mapping, without validating it (standard library and PyYAML).

``damselfly run --agent`` sends the file as it is to the node agent, which validates it; so the CLI need
not import the config models on its way to starting a container.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared.errors import ConfigError


def read_config_document(path: Path) -> dict[str, Any]:
    """The mapping in a JSON or YAML file (ConfigError naming the problem).

    ``shared.config.read_yaml_document`` reads the services' files the same way, but importing
    ``shared.config`` loads pydantic-settings, which a container start should not pay for.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"config error: cannot read {path}: {exc.strerror}") from exc
    try:
        if text.lstrip().startswith("{"):
            document = json.loads(text)
        else:
            import yaml  # Only YAML files pay for it.

            document = yaml.safe_load(text)
    except Exception as exc:  # json.JSONDecodeError or yaml.YAMLError (whose import is deferred).
        raise ConfigError(f"config error in {path}: not valid JSON or YAML: {str(exc).splitlines()[0]}") from exc
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"config error in {path}: the top level must be a mapping")
    return document
