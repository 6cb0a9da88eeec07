"""The input event contract: click, search and review events as JSON, keyed by user id.

`parse_event` is the single gate between untrusted bytes and the engine. Anything it rejects raises
`InvalidEvent` with a reason a human can act on; the ingest agent sends those to the dead-letter topic.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal, TypeAlias

import orjson

EventType: TypeAlias = Literal["click", "search", "review"]
EVENT_TYPES: Final[tuple[EventType, ...]] = ("click", "search", "review")

# Event time must be a real instant of user behaviour. Before 1970 is a zeroed or signed-overflow clock;
# after 2200 is almost always milliseconds or microseconds sent as seconds (1.7e12 "seconds" is year
# ~55,800). Either would wreck decay for that user: one event 2^k half-lives ahead moves the landmark and
# makes every earlier and later event of the user decay to zero. 2200 leaves room for any real clock skew.
MIN_TS: Final = 0.0
MAX_TS: Final = 7258118400.0  # 2200-01-01T00:00:00Z
MAX_ID_CHARS: Final = 256
MAX_FIELD_CHARS: Final = 1024
# orjson's own nesting limit; stated here because the reason text names it.
MAX_JSON_DEPTH: Final = 1024
# Ids end up in Kafka keys, HTTP paths and log lines: a newline or NUL in one forges or truncates those.
_CONTROL_CHARS: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_ID_FIELDS: Final = frozenset({"event_id", "user_id", "item_id"})

_COMMON_FIELDS: Final = frozenset({"event_id", "user_id", "ts", "type"})
_ALLOWED_FIELDS: Final[dict[str, frozenset[str]]] = {
    "click": _COMMON_FIELDS | {"item_id", "category", "dwell_ms"},
    "search": _COMMON_FIELDS | {"query", "category"},
    "review": _COMMON_FIELDS | {"item_id", "text", "rating", "category"},
}


# Why a message went to the dead-letter topic, as a small fixed set (the `dlq.kind` header and the
# metrics label): consumers and dashboards switch on this, people read the free-text reason beside it.
RejectKind: TypeAlias = Literal[
    "malformed_json", "empty", "too_large", "not_an_object", "unknown_type", "unknown_field", "missing_field",
    "key_mismatch", "wrong_topic", "bad_timestamp", "bad_rating", "empty_field", "bad_characters", "wrong_type",
    "encoder_error", "validator_error",
    # future_timestamp: ts more than PROFILE_MAX_FUTURE_S past the wall clock at ingest (docs/hostile-input.md).
    # processing_error: a by-user bundle or one user's events the profile agent could not fold.
    "future_timestamp", "processing_error",
]
REJECT_KINDS: Final[tuple[RejectKind, ...]] = RejectKind.__args__  # type: ignore[attr-defined]


class InvalidEvent(ValueError):
    """The message is not a valid event; `reason` says why in plain words, `kind` classifies it."""

    def __init__(self, kind: RejectKind, reason: str) -> None:
        super().__init__(reason)
        self.kind: RejectKind = kind
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
        raise InvalidEvent("bad_timestamp", "ts must be epoch seconds or an ISO-8601 string, got a boolean")
    if isinstance(value, int | float):
        ts = float(value)
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidEvent("bad_timestamp", f"ts {value[:64]!r} is not an ISO-8601 timestamp") from None
        if parsed.tzinfo is None:
            raise InvalidEvent("bad_timestamp", f"ts {value[:64]!r} has no time zone; event time must be unambiguous")
        ts = parsed.timestamp()
    else:
        raise InvalidEvent("bad_timestamp", f"ts must be epoch seconds or an ISO-8601 string, got {_type_name(value)}")
    if not math.isfinite(ts):
        raise InvalidEvent("bad_timestamp", "ts is not finite")
    if not MIN_TS <= ts < MAX_TS:
        raise InvalidEvent("bad_timestamp", f"ts {ts!r} is outside 1970-01-01..2200-01-01")
    return ts


def _required_str(doc: dict[str, Any], name: str, limit: int) -> str:
    if name not in doc:
        raise InvalidEvent("missing_field", f"missing field {name!r}")
    return _str_value(doc[name], name, limit)


def _optional_str(doc: dict[str, Any], name: str, limit: int) -> str | None:
    value = doc.get(name)
    return None if value is None else _str_value(value, name, limit)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _str_value(value: Any, name: str, limit: int) -> str:
    if value is None:
        raise InvalidEvent("missing_field", f"{name} is null")
    if not isinstance(value, str):
        raise InvalidEvent("wrong_type", f"{name} must be a string, got {_type_name(value)}")
    if not value.strip():
        raise InvalidEvent("empty_field", f"{name} is empty")
    if len(value) > limit:
        raise InvalidEvent("too_large", f"{name} is {len(value)} characters, over the limit of {limit}")
    if name in _ID_FIELDS:
        bad = _CONTROL_CHARS.search(value)
        if bad is not None:
            raise InvalidEvent("bad_characters", f"{name} contains the control character U+{ord(bad.group()):04X}")
    return value


def validate_event(doc: Any, *, max_text_chars: int, key: bytes | None = None) -> Event:
    """Check a decoded JSON document against the contract and return the typed event."""
    if not isinstance(doc, dict):
        raise InvalidEvent("not_an_object", f"event must be a JSON object, got {_type_name(doc)}")
    event_type = doc.get("type")
    # Checked for str first: a list or object here is unhashable, and str() of a 1000-deep one recurses.
    if event_type is None:
        raise InvalidEvent("missing_field", "missing field 'type'")
    if not isinstance(event_type, str):
        raise InvalidEvent("wrong_type", f"type must be a string, got {_type_name(event_type)}")
    if event_type not in _ALLOWED_FIELDS:
        raise InvalidEvent("unknown_type", f"unknown event type {event_type[:64]!r}; expected click, search or review")
    unknown = sorted(set(doc) - _ALLOWED_FIELDS[event_type])
    if unknown:
        names = ", ".join(n[:64] for n in unknown[:5])
        raise InvalidEvent("unknown_field", f"unknown field(s) for a {event_type} event: {names}")
    event_id = _required_str(doc, "event_id", MAX_ID_CHARS)
    user_id = _required_str(doc, "user_id", MAX_ID_CHARS)
    if key is not None and key != user_id.encode():
        raise InvalidEvent("key_mismatch", "message key does not match user_id")
    if "ts" not in doc:
        raise InvalidEvent("missing_field", "missing field 'ts'")
    ts = parse_ts(doc["ts"])
    category = _optional_str(doc, "category", MAX_FIELD_CHARS)

    if event_type == "click":
        dwell = doc.get("dwell_ms")
        if dwell is not None:
            if isinstance(dwell, bool) or not isinstance(dwell, int | float):
                raise InvalidEvent("wrong_type", f"dwell_ms must be a number, got {_type_name(dwell)}")
            if not math.isfinite(dwell) or dwell < 0:
                raise InvalidEvent("wrong_type", "dwell_ms must be a finite, non-negative number")
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
        # Never str() a non-number: a 1000-deep array would recurse past Python's limit.
        if isinstance(rating, bool) or not isinstance(rating, int | float):
            raise InvalidEvent("bad_rating", f"rating must be an integer 1-5, got {_type_name(rating)}")
        if rating != int(rating):
            raise InvalidEvent("bad_rating", f"rating must be an integer 1-5, got {rating!r}")
        if not 1 <= rating <= 5:
            raise InvalidEvent("bad_rating", f"rating {rating} is out of range 1-5")
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
        raise InvalidEvent("empty", "empty message value")
    if len(raw) > max_event_bytes:
        raise InvalidEvent("too_large", f"message is {len(raw)} bytes, over the limit of {max_event_bytes}")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson rejects invalid UTF-8, NaN/Infinity literals and nesting deeper than 1024 levels
        # without recursing (measured: 100,000 nested arrays are refused at depth 1025).
        raise InvalidEvent("malformed_json", f"not valid JSON: {_json_error(raw, exc)}") from None
    return validate_event(doc, max_text_chars=max_text_chars, key=key)


def _json_error(raw: bytes, exc: orjson.JSONDecodeError) -> str:
    """orjson's message, made specific for the hostile cases a producer most needs to recognise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"invalid UTF-8 at byte {bad.start}"
    message = str(exc)
    if message.startswith("depth limit exceeded"):
        return f"nested deeper than {MAX_JSON_DEPTH} levels"
    token = text[exc.pos:exc.pos + 9].lstrip("-")
    if token.startswith(("NaN", "Infinity")):
        return f"NaN/Infinity at character {exc.pos} is not a JSON number"
    return message


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
