"""The event contract: what is accepted, and the reason given for everything that is not."""

from __future__ import annotations

import orjson
import pytest

from schemas.events import Event, InvalidEvent, event_from_trusted_json, parse_event

LIMITS = {"max_event_bytes": 4096, "max_text_chars": 100}


def parse(doc: object, key: bytes | None = None) -> Event:
    raw = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return parse_event(raw, key=key, **LIMITS)


def base(**fields: object) -> dict[str, object]:
    doc: dict[str, object] = {"event_id": "e1", "user_id": "u1", "ts": 1700000000, "type": "click", "item_id": "i1"}
    doc.update(fields)
    return {k: v for k, v in doc.items() if v is not None}


def test_accepts_all_three_types_with_optional_fields() -> None:
    assert parse(base(category="shoes", dwell_ms=1200)) == Event(
        "e1", "u1", 1700000000.0, "click", category="shoes", item_id="i1", dwell_ms=1200.0)
    search = parse(base(type="search", item_id=None, query="red shoes"))
    assert search.query == "red shoes" and search.category is None
    review = parse(base(type="review", text="Lovely", rating=5))
    assert review.rating == 5 and review.text == "Lovely"


@pytest.mark.parametrize(("ts", "expected"), [
    ("2023-11-14T22:13:20+00:00", 1700000000.0),
    ("2023-11-14T23:13:20+01:00", 1700000000.0),
    ("2023-11-14T22:13:20Z", 1700000000.0),
    (1700000000.5, 1700000000.5),
])
def test_event_time_forms(ts: object, expected: float) -> None:
    assert parse(base(ts=ts)).ts == expected


@pytest.mark.parametrize(("raw", "reason"), [
    (b"", "empty message"),
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b'{"ts": NaN}', "not valid JSON"),
    (b"[" * 2000 + b"]" * 2000, "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"x" * 5000, "over the limit of 4096"),
])
def test_rejects_bytes_that_are_not_an_event(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        parse_event(raw, **LIMITS)


@pytest.mark.parametrize(("doc", "reason"), [
    (base(type="purchase"), "unknown event type 'purchase'"),
    (base(type=None), "missing field 'type'"),
    (base(event_id=None), "missing field 'event_id'"),
    (base(user_id=""), "user_id is empty"),
    (base(user_id=42), "user_id must be a string, got int"),
    (base(ts=None), "missing field 'ts'"),
    (base(ts="yesterday"), "not an ISO-8601"),
    (base(ts="2023-11-14T22:13:20"), "no time zone"),
    (base(ts=True), "got a boolean"),
    (base(ts=-1), "outside 1970-01-01..2200-01-01"),
    (base(ts="9999-12-31T00:00:00+00:00"), "outside"),
    (base(ts=1e300), "outside"),
    (base(item_id=None), "missing field 'item_id'"),
    (base(dwell_ms=-5), "non-negative"),
    (base(dwell_ms="long"), "dwell_ms must be a number"),
    (base(color="red"), "unknown field(s) for a click event: color"),
    (base(type="search", item_id=None), "missing field 'query'"),
    (base(type="review", text="ok", rating=6), "out of range 1-5"),
    (base(type="review", text="ok", rating=0), "out of range 1-5"),
    (base(type="review", text="ok", rating=4.5), "integer 1-5"),
    (base(type="review", text="ok", rating=True), "integer 1-5"),
    (base(type="review", text="x" * 101), "text is 101 characters, over the limit of 100"),
    (base(type="review", text="   "), "text is empty"),
    (base(type="review", text="ok", sentiment=0.5), "unknown field"),
])
def test_rejects_documents_that_break_the_contract(doc: dict[str, object], reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason.replace("(", r"\(").replace(")", r"\)")):
        parse(doc)


def test_key_must_match_user_id_when_present() -> None:
    assert parse(base(), key=b"u1").user_id == "u1"
    with pytest.raises(InvalidEvent, match="key does not match user_id"):
        parse(base(), key=b"u2")


def test_trusted_round_trip_keeps_every_field() -> None:
    event = Event("e", "u", 1.5, "review", category="c", item_id="i", text="t", rating=3,
                  sentiment=0.25, embedding=(0.1, 0.2))
    assert event_from_trusted_json(event.to_json()) == event
