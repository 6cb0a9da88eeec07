"""`stream-app snapshot`: every profile as the delta topic gives it, read from the beginning."""

from __future__ import annotations

import logging
from typing import Any

from stream_app.core.profile import Delta
from stream_app.core.replica import ProfileReplicas
from stream_app.kafka.reading import read_topic
from stream_app.ops.settings import Settings
from stream_app.serving.deltas import MalformedDelta, parse_delta

log = logging.getLogger(__name__)


async def read_deltas(settings: Settings) -> list[Delta]:
    """Every applicable delta of the topic; records that are not one are skipped like the subscriber skips
    them (so snapshot and Redis agree), with a warning that names their position, not their payload."""
    deltas = []
    for record in await read_topic(settings, settings.topic_deltas):
        if record.value is None:
            continue
        try:
            deltas.append(parse_delta(record.value))
        except MalformedDelta as error:
            log.warning("snapshot: %s[%d]@%d is not a delta (%s): skipped", record.topic, record.partition,
                        record.offset, error)
    return deltas


async def snapshot(settings: Settings, at: float | None = None) -> list[dict[str, Any]]:
    return list(ProfileReplicas().apply_all(await read_deltas(settings)).views(at))
