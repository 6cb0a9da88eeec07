"""Ingest: validate raw events, re-key them by user id, and dead-letter everything else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from faust import StreamT

from schemas.events import Event, InvalidEvent, parse_event
from stream_app.app import app, settings
from stream_app.topics import dead_letters, events_by_user, raw_events

TYPE_OF_TOPIC = {
    settings.topic_clicks: "click",
    settings.topic_searches: "search",
    settings.topic_reviews: "review",
}


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str


def triage(topic: str, key: bytes | None, value: bytes | None) -> Event | Rejection:
    """The pure decision: a valid event for its topic, or the reason it is not one."""
    try:
        event = parse_event(
            value, key=key, max_event_bytes=settings.max_event_bytes, max_text_chars=settings.max_text_chars
        )
    except InvalidEvent as exc:
        return Rejection(exc.reason)
    expected = TYPE_OF_TOPIC.get(topic)
    if expected is not None and event.type != expected:
        return Rejection(f"a {event.type} event does not belong on topic {topic!r} (expects {expected})")
    return event


def dead_letter_headers(reason: str, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    return [
        ("dlq.reason", reason.encode()),
        ("dlq.topic", topic.encode()),
        ("dlq.partition", str(partition).encode()),
        ("dlq.offset", str(offset).encode()),
    ]


@app.agent(raw_events)
async def ingest(stream: StreamT[bytes]) -> AsyncIterator[None]:
    async for event in stream.events():
        message = event.message
        verdict = triage(message.topic, message.key, message.value)
        if isinstance(verdict, Rejection):
            # The original bytes, untouched, with where they came from and why they were refused.
            await dead_letters.send(
                key=message.key, value=message.value,
                headers=dead_letter_headers(verdict.reason, message.topic, message.partition, message.offset),
            )
        else:
            await events_by_user.send(key=verdict.user_id, value=verdict.to_json())
        yield None
