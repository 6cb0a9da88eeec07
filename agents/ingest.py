"""Ingest: validate clicks and searches, re-key them by user id, and dead-letter everything else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast

from faust import StreamT
from faust.streams import Stream

from stream_app import metrics
from stream_app.app import app, settings
from stream_app.publish import admit, publish_events
from stream_app.topics import clicks_and_searches


@app.agent(clicks_and_searches)
async def ingest(stream: StreamT[bytes]) -> AsyncIterator[int]:
    async for batch in cast(Stream[bytes], stream).take_events(settings.batch_max, within=settings.batch_within_s):
        metrics.BATCH_EVENTS.labels("ingest").observe(len(batch))
        valid = [event for event, _ in await admit(batch)]
        await publish_events(valid)
        yield len(batch)
