"""Ingest: validate clicks and searches, re-key them by user id, and dead-letter everything else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast

from faust import StreamT
from faust.streams import Stream

from schemas.events import Event
from stream_app import metrics
from stream_app.app import app, settings
from stream_app.publish import publish_dead_letter, publish_events
from stream_app.topics import clicks_and_searches
from stream_app.triage import Rejection, triage


@app.agent(clicks_and_searches)
async def ingest(stream: StreamT[bytes]) -> AsyncIterator[int]:
    async for batch in cast(Stream[bytes], stream).take_events(settings.batch_max, within=settings.batch_within_s):
        metrics.BATCH_EVENTS.labels("ingest").observe(len(batch))
        valid: list[Event] = []
        for event in batch:
            message = event.message
            verdict = triage(settings, message.topic, message.key, message.value)
            if isinstance(verdict, Rejection):
                await publish_dead_letter(message, verdict.reason)
            else:
                valid.append(verdict)
        await publish_events(valid)
        yield len(batch)
