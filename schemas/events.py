"""The input event contract: click, search and review events as JSON, keyed by user id.

`parse_event` is the single gate between untrusted bytes and the engine. Anything it rejects raises
`InvalidEvent` with a reason a human can act on; the ingest agent sends those to the dead-letter topic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal, TypeAlias

import orjson

EventType: TypeAlias = Literal["click", "search", "review"]
EVENT_TYPES: Final[tuple[EventType, ...]] = ("click", "search", "review")

# Event time must be a real instant of user behaviour: before 1970 or after 2200 is a producer bug
# (milliseconds sent as seconds, a zeroed clock), and such values would wreck decay for that user.
MIN_TS: Final = 0.0
MAX_TS: Final = 7258118400.0  # 2200-01-01T00:00:00Z
MAX_ID_CHARS: Final = 256
MAX_FIELD_CHARS: Final = 1024

_COMMON_FIELDS: Final = frozenset({"event_id", "user_id", "ts", "type"})
_ALLOWED_FIELDS: Final[dict[str, frozenset[str]]] = {
    "click": _COMMON_FIELDS | {"item_id", "category", "dwell_ms"},
    "search": _COMMON_FIELDS | {"query", "category"},
    "review": _COMMON_FIELDS | {"item_id", "text", "rating", "category"},
}


class InvalidEvent(ValueError):
    """The message is not a valid event; `reason` says why in plain words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Event:
    event_id: str
    user_id: str
    ts: float
    type: EventType
    category: str | None = None
    item_id: str | None = None
    dwell_ms: float | None = None
    query: str | None = None
    text: str | None = None
    rating: int | None = None
    # Filled by the review encoder stage, never accepted from producers.
    sentiment: float | None = None
    embedding: tuple[float, ...] | None = None

    def to_json(self) -> bytes:
        return orjson.dumps({k: v for k, v in _event_items(self) if v is not None})


def _event_items(event: Event) -> list[tuple[str, Any]]:
    return [(name, getattr(event, name)) for name in Event.__slots__]


def parse_ts(value: Any) -> float:
    """Event time in epoch seconds from an int/float or an ISO-8601 string that carries a zone."""
    if isinstance(value, bool):
        raise InvalidEvent("ts must be epoch seconds or an ISO-8601 string, got a boolean")
    if isinstance(value, int | float):
        ts = float(value)
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidEvent(f"ts {value[:64]!r} is not an ISO-8601 timestamp") from None
        if parsed.tzinfo is None:
            raise InvalidEvent(f"ts {value[:64]!r} has no time zone; event time must be unambiguous")
        ts = parsed.timestamp()
    else:
        raise InvalidEvent(f"ts must be epoch seconds or an ISO-8601 string, got {type(value).__name__}")
    if not math.isfinite(ts):
        raise InvalidEvent("ts is not finite")
    if not MIN_TS <= ts < MAX_TS:
        raise InvalidEvent(f"ts {ts!r} is outside 1970-01-01..2200-01-01")
    return ts


def _required_str(doc: dict[str, Any], name: str, limit: int) -> str:
    if name not in doc:
        raise InvalidEvent(f"missing field {name!r}")
    return _str_value(doc[name], name, limit)


def _optional_str(doc: dict[str, Any], name: str, limit: int) -> str | None:
    value = doc.get(name)
    return None if value is None else _str_value(value, name, limit)


def _str_value(value: Any, name: str, limit: int) -> str:
    if not isinstance(value, str):
        raise InvalidEvent(f"{name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidEvent(f"{name} is empty")
    if len(value) > limit:
        raise InvalidEvent(f"{name} is {len(value)} characters, over the limit of {limit}")
    return value


def validate_event(doc: Any, *, max_text_chars: int, key: bytes | None = None) -> Event:
    """Check a decoded JSON document against the contract and return the typed event."""
    if not isinstance(doc, dict):
        raise InvalidEvent(f"event must be a JSON object, got {type(doc).__name__}")
    event_type = doc.get("type")
    if event_type not in _ALLOWED_FIELDS:
        raise InvalidEvent(f"unknown event type {str(event_type)[:64]!r}; expected click, search or review")
    unknown = sorted(set(doc) - _ALLOWED_FIELDS[event_type])
    if unknown:
        raise InvalidEvent(f"unknown field(s) for a {event_type} event: {', '.join(n[:64] for n in unknown[:5])}")
    event_id = _required_str(doc, "event_id", MAX_ID_CHARS)
    user_id = _required_str(doc, "user_id", MAX_ID_CHARS)
    if key is not None and key != user_id.encode():
        raise InvalidEvent("message key does not match user_id")
    if "ts" not in doc:
        raise InvalidEvent("missing field 'ts'")
    ts = parse_ts(doc["ts"])
    category = _optional_str(doc, "category", MAX_FIELD_CHARS)

    if event_type == "click":
        dwell = doc.get("dwell_ms")
        if dwell is not None:
            if isinstance(dwell, bool) or not isinstance(dwell, int | float):
                raise InvalidEvent(f"dwell_ms must be a number, got {type(dwell).__name__}")
            if not math.isfinite(dwell) or dwell < 0:
                raise InvalidEvent("dwell_ms must be a finite, non-negative number")
        return Event(
            event_id, user_id, ts, "click", category=category,
            item_id=_required_str(doc, "item_id", MAX_ID_CHARS),
            dwell_ms=None if dwell is None else float(dwell),
        )
    if event_type == "search":
        return Event(event_id, user_id, ts, "search", category=category,
                     query=_required_str(doc, "query", MAX_FIELD_CHARS))
    rating = doc.get("rating")
    if rating is not None:
        if isinstance(rating, bool) or not isinstance(rating, int | float) or rating != int(rating):
            raise InvalidEvent(f"rating must be an integer 1-5, got {str(rating)[:32]}")
        if not 1 <= rating <= 5:
            raise InvalidEvent(f"rating {rating} is out of range 1-5")
        rating = int(rating)
    return Event(
        event_id, user_id, ts, "review", category=category,
        item_id=_required_str(doc, "item_id", MAX_ID_CHARS),
        text=_required_str(doc, "text", max_text_chars),
        rating=rating,
    )


def parse_event(
    raw: bytes | None, *, key: bytes | None = None, max_event_bytes: int, max_text_chars: int
) -> Event:
    """Decode and validate one message value. Raises `InvalidEvent` with the reason on any problem."""
    if raw is None or len(raw) == 0:
        raise InvalidEvent("empty message value")
    if len(raw) > max_event_bytes:
        raise InvalidEvent(f"message is {len(raw)} bytes, over the limit of {max_event_bytes}")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson rejects invalid UTF-8, NaN/Infinity literals and nesting deeper than 1024 levels.
        raise InvalidEvent(f"not valid JSON: {exc}") from None
    return validate_event(doc, max_text_chars=max_text_chars, key=key)


def event_from_trusted_json(raw: bytes) -> Event:
    """Decode an event the ingest agent already validated (the internal by-user topic)."""
    return event_from_trusted_doc(orjson.loads(raw))


def event_from_trusted_doc(doc: dict[str, Any]) -> Event:
    return Event(
        doc["event_id"], doc["user_id"], doc["ts"], doc["type"],
        category=doc.get("category"), item_id=doc.get("item_id"), dwell_ms=doc.get("dwell_ms"),
        query=doc.get("query"), text=doc.get("text"), rating=doc.get("rating"),
        sentiment=doc.get("sentiment"),
        embedding=None if doc.get("embedding") is None else tuple(doc["embedding"]),
    )
