"""Ingest: validate clicks and searches, re-key them by user id, and dead-letter everything else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast

from faust import StreamT
from faust.streams import Stream

from stream_app.app import app, settings
from stream_app.topics import clicks_and_searches, dead_letters, events_by_user
from stream_app.triage import Rejection, dead_letter_headers, triage


@app.agent(clicks_and_searches)
async def ingest(stream: StreamT[bytes]) -> AsyncIterator[int]:
    async for batch in cast(Stream[bytes], stream).take_events(settings.batch_max, within=settings.batch_within_s):
        for event in batch:
            message = event.message
            verdict = triage(settings, message.topic, message.key, message.value)
            if isinstance(verdict, Rejection):
                # The original bytes, untouched, with where they came from and why they were refused.
                await dead_letters.send(
                    key=message.key, value=message.value, headers=dead_letter_headers(verdict.reason, message)
                )
            else:
                await events_by_user.send(key=verdict.user_id, value=verdict.to_json())
        yield len(batch)
