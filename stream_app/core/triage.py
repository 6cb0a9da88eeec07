"""The decision every input message gets: a valid event for its topic, or a rejection with a kind and reason."""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass

from schemas.events import Event, InvalidEvent, RejectKind, parse_event
from stream_app.ops.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Rejection:
    kind: RejectKind
    reason: str


def triage(settings: Settings, topic: str, key: bytes | None, value: bytes | None, now: float) -> Event | Rejection:
    """`now` is the ingest clock (wall-clock epoch seconds, passed in so that this stays a pure function)."""
    try:
        event = parse_event(
            value, key=key, max_event_bytes=settings.max_event_bytes, max_text_chars=settings.max_text_chars
        )
    except InvalidEvent as exc:
        return Rejection(exc.kind, exc.reason)
    except Exception as exc:
        # A validator bug must cost one dead letter, not the worker. The exception's message may quote
        # the payload (review text), so only its type and where it was raised are logged.
        where = traceback.extract_tb(exc.__traceback__)[-1]
        logger.error("validator bug: %s at %s:%s on a message from topic %s",
                     type(exc).__name__, where.filename, where.lineno, topic)
        return Rejection("validator_error",
                         f"validator error ({type(exc).__name__}); this is a bug in the engine, not the message")
    expected = settings.event_type_of_topic(topic)
    if expected is not None and event.type != expected:
        return Rejection("wrong_topic", f"a {event.type} event does not belong on topic {topic!r} (expects {expected})")
    if event.ts > now + settings.max_future_s:
        # One mis-stamped event would move the user's landmark and as_of ahead, and every real event after it
        # would decay against that future instant (docs/hostile-input.md: bad clocks).
        return Rejection("future_timestamp", f"ts {event.ts!r} is {event.ts - now:.0f} s past the wall clock at ingest "
                                             f"({now:.0f}), more than the {settings.max_future_s:.0f} s allowed")
    return event
