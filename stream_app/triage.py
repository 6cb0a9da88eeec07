"""The decision every input message gets: a valid event for its topic, or a dead letter with a reason."""

from __future__ import annotations

from dataclasses import dataclass

from faust.types import Message

from schemas.events import Event, InvalidEvent, parse_event
from stream_app.settings import Settings


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str


def triage(settings: Settings, topic: str, key: bytes | None, value: bytes | None) -> Event | Rejection:
    try:
        event = parse_event(
            value, key=key, max_event_bytes=settings.max_event_bytes, max_text_chars=settings.max_text_chars
        )
    except InvalidEvent as exc:
        return Rejection(exc.reason)
    expected = {
        settings.topic_clicks: "click", settings.topic_searches: "search", settings.topic_reviews: "review",
    }.get(topic)
    if expected is not None and event.type != expected:
        return Rejection(f"a {event.type} event does not belong on topic {topic!r} (expects {expected})")
    return event


def dead_letter_headers(reason: str, message: Message) -> list[tuple[str, bytes]]:
    """Where the original bytes came from and why they were refused (the value itself stays untouched)."""
    return [
        ("dlq.reason", reason.encode()),
        ("dlq.topic", message.topic.encode()),
        ("dlq.partition", str(message.partition).encode()),
        ("dlq.offset", str(message.offset).encode()),
    ]
