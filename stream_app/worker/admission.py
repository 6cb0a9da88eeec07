"""The input step of both input agents: triage each message, dead-letter what is refused."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import orjson
from faust.types import EventT, Message

from schemas.events import Event
from stream_app.core.triage import Rejection, triage
from stream_app.ops.settings import Settings
from stream_app.worker.publish import Output

Position = tuple[str, int, int]  # (topic, partition, offset) of an input record


def load_replay_refusals(path: str | None) -> frozenset[Position]:
    """The records a live run refused as future_timestamp (written by `stream-app replay`)."""
    if path is None:
        return frozenset()
    return frozenset((str(t), int(p), int(o)) for t, p, o in orjson.loads(Path(path).read_bytes()))


async def admit(settings: Settings, output: Output, batch: Iterable[EventT],
                refused_live: frozenset[Position] = frozenset()) -> list[tuple[Event, Message]]:
    """The valid events of a micro-batch, with their messages; every other message becomes a dead letter.

    `refused_live` (replays only): records the live run refused as future_timestamp. A replay runs later, so
    its own clock would accept some of them; refusing them again keeps replay == live. What live accepted,
    any later clock accepts too, so nothing else needs the live run's clock.
    """
    admitted: list[tuple[Event, Message]] = []
    now = time.time()  # the ingest clock of the future-timestamp rule: one reading per micro-batch
    for stream_event in batch:
        message = stream_event.message
        verdict: Event | Rejection
        if (message.topic, message.partition, message.offset) in refused_live:
            verdict = Rejection("future_timestamp", "refused as future_timestamp by the live run this replays")
        else:
            verdict = triage(settings, message.topic, message.key, message.value, now)
        if isinstance(verdict, Rejection):
            await output.dead_letter(message, verdict)
        else:
            admitted.append((verdict, message))
    return admitted
