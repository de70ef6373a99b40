"""Learned prefetch lists in a JetStream key-value bucket, keyed by image digest.

The first cold start of an image anywhere records the chunks its first seconds read, in order; the agent
that ran it stores that list under the image's digest with ``create`` (so the first recording wins and
later ones cannot overwrite it).  An agent mounting the image later reads the list and hands it to its
daemon, which prefetches exactly those chunks first.  Chunk numbers index the bootstrap's chunk table,
which the image digest pins, so a list can never be applied to a different bootstrap.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from nats.aio.client import Client as NatsClient
from nats.js import api
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field

logger = logging.getLogger(__name__)

BUCKET = "DAMSELFLY_LEARNED_PREFETCH"
FORMAT_VERSION = 1


class LearnedList(BaseModel):
    """One image's learned prefetch list, as stored."""

    version: int = FORMAT_VERSION
    image_digest: str
    chunks: list[int]
    recorded_by: str = Field(description="Node whose cold start recorded it.")
    recorded_at: float = Field(default_factory=time.time)
    record_seconds: float = 0.0


def key_for(digest: str) -> str:
    """The KV key of an image digest (``sha256:<hex>`` becomes ``sha256_<hex>``: ':' is not a key character)."""
    algorithm, _, hexpart = digest.partition(":")
    return f"{algorithm}_{hexpart}"


async def bucket(nc: NatsClient, *, replicas: int = 1, create: bool = True) -> KeyValue:
    """The bucket, created on first use."""
    js = nc.jetstream()
    try:
        return await js.key_value(BUCKET)
    except BucketNotFoundError:
        if not create:
            raise
    config = api.KeyValueConfig(
        bucket=BUCKET,
        description="Learned prefetch lists: chunks an image's first cold start read, by image digest.",
        history=1,
        replicas=replicas,
        max_value_size=4 << 20,
    )
    return await js.create_key_value(config)


async def load(kv: KeyValue, digest: str) -> LearnedList | None:
    """The learned list of an image, or None when none was recorded yet."""
    try:
        entry = await kv.get(key_for(digest))
    except KeyNotFoundError:
        return None
    if not entry.value:
        return None
    try:
        learned = LearnedList.model_validate(orjson.loads(entry.value))
    except ValueError as exc:
        logger.warning("learned prefetch list of %s is malformed: %s", digest, exc)
        return None
    if learned.version != FORMAT_VERSION or learned.image_digest != digest:
        return None
    return learned


async def publish(kv: KeyValue, learned: LearnedList) -> bool:
    """Store a list unless one exists already; True if this one was stored."""
    try:
        await kv.create(key_for(learned.image_digest), orjson.dumps(learned.model_dump()))
    except KeyWrongLastSequenceError:
        return False
    return True


def summary(learned: LearnedList | None) -> dict[str, Any]:
    """A short description for APIs and logs."""
    if learned is None:
        return {"known": False}
    return {"known": True, "chunks": len(learned.chunks), "recorded_by": learned.recorded_by}
