"""The input step of both input agents: triage each message, dead-letter what is refused."""

from __future__ import annotations

import time
from collections.abc import Iterable

from faust.types import EventT, Message

from schemas.events import Event
from stream_app.core.triage import Rejection, triage
from stream_app.ops.settings import Settings
from stream_app.worker.publish import Output


async def admit(settings: Settings, output: Output, batch: Iterable[EventT]) -> list[tuple[Event, Message]]:
    """The valid events of a micro-batch, with their messages; every other message becomes a dead letter."""
    admitted: list[tuple[Event, Message]] = []
    now = time.time()  # the ingest clock of the future-timestamp rule: one reading per micro-batch
    for stream_event in batch:
        message = stream_event.message
        verdict = triage(settings, message.topic, message.key, message.value, now)
        if isinstance(verdict, Rejection):
            await output.dead_letter(message, verdict)
        else:
            admitted.append((verdict, message))
    return admitted
