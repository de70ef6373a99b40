"""JSON Schema files for every event, written by ``damselfly schemas export DIR`` and checked in CI."""

from __future__ import annotations

from pathlib import Path

import orjson

from shared.schemas.events import EVENT_TYPES, Event

# The checked-in copy: a test fails when a model changes and this directory was not regenerated.
CHECKED_IN_DIR = Path(__file__).parent / "json"


def schema_file_name(event_type: type[Event]) -> str:
    """``peer.registered.v1.json``."""
    return f"{event_type.name}.v{event_type.version}.json"


def render_schema(event_type: type[Event]) -> bytes:
    """One event's JSON Schema, with its name, version and subject, in a stable byte form."""
    schema = event_type.model_json_schema()
    schema["$id"] = f"https://damselfly.dev/schemas/{event_type.name}/v{event_type.version}"
    schema["x-damselfly-event"] = event_type.schema_tag()
    schema["x-damselfly-subject"] = event_type.subject_base
    return orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def export_schemas(directory: Path) -> list[Path]:
    """Write every event's schema into ``directory``; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for event_type in EVENT_TYPES:
        path = directory / schema_file_name(event_type)
        path.write_bytes(render_schema(event_type))
        written.append(path)
    return written


def stale_schemas(directory: Path = CHECKED_IN_DIR) -> list[str]:
    """Names of schema files missing from, or different in, ``directory`` (empty when up to date)."""
    stale = []
    for event_type in EVENT_TYPES:
        path = directory / schema_file_name(event_type)
        if not path.exists() or path.read_bytes() != render_schema(event_type):
            stale.append(path.name)
    return stale
