"""`stream-app snapshot`: every profile as the delta topic gives it, read from the beginning."""

from __future__ import annotations

from typing import Any

import orjson

from stream_app.core.profile import Delta
from stream_app.core.replica import ProfileReplicas
from stream_app.kafka.reading import read_topic
from stream_app.ops.settings import Settings


async def read_deltas(settings: Settings) -> list[Delta]:
    return [orjson.loads(r.value) for r in await read_topic(settings, settings.topic_deltas) if r.value is not None]


async def snapshot(settings: Settings, at: float | None = None) -> list[dict[str, Any]]:
    return list(ProfileReplicas().apply_all(await read_deltas(settings)).views(at))
