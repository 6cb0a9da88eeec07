"""Hostile input: every corpus message is refused with its exact reason, and triage never raises."""

from __future__ import annotations

import string
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from schemas.events import MAX_ID_CHARS, MAX_TS, Event, InvalidEvent, parse_event
from stream_app.core.triage import Rejection, triage
from stream_app.ops.settings import Settings
from tests.hostile_corpus import Hostile, hostile_corpus, nested

SETTINGS = Settings(topic_clicks="clicks-t", topic_searches="searches-t", topic_reviews="reviews-t")
CORPUS = hostile_corpus(SETTINGS)
TOPICS = SETTINGS.input_topics
# The ingest clock for the document checks: at the end of the accepted range no event is in the future
# (the future-timestamp rule has tests of its own below).
LATE_CLOCK = MAX_TS


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
def test_every_corpus_message_is_rejected_with_its_reason(case: Hostile) -> None:
    verdict = triage(SETTINGS, case.topic_name(SETTINGS), case.key, case.value, LATE_CLOCK)
    assert verdict == Rejection(case.kind, case.reason)


def test_corpus_covers_every_input_topic_and_the_kinds_that_matter() -> None:
    assert {case.topic for case in CORPUS} == {"click", "search", "review"}
    kinds = {case.kind for case in CORPUS}
    assert "other" not in kinds
    assert kinds >= {"malformed_json", "empty", "too_large", "not_an_object", "unknown_type", "unknown_field",
                     "missing_field", "key_mismatch", "wrong_topic", "bad_timestamp", "bad_rating",
                     "empty_field", "wrong_type", "bad_characters"}


def test_100k_nested_arrays_are_refused_by_the_parser_without_recursing() -> None:
    # Over the default size limit the bytes never reach the parser; with the limit lifted, orjson must
    # still refuse them at its depth limit rather than recurse.
    with pytest.raises(InvalidEvent, match="^not valid JSON: nested deeper than 1024 levels$"):
        parse_event(nested(100_000), max_event_bytes=1 << 20, max_text_chars=100)


@pytest.mark.parametrize(("doc_bytes", "crash"), [
    # Both raised TypeError/RecursionError out of the validator before the fix, killing the ingest agent.
    (b'{"type": [1]}', "unhashable list"),
    (b'{"event_id":"e","user_id":"u","ts":1,"type":"review","item_id":"i","text":"t","rating":'
     + nested(1000) + b"}", "str() of a 1000-deep array"),
])
def test_validator_bugs_found_by_the_corpus_are_fixed(doc_bytes: bytes, crash: str) -> None:
    with pytest.raises(InvalidEvent):
        parse_event(doc_bytes, max_event_bytes=1 << 20, max_text_chars=100)


def test_a_validator_bug_becomes_a_dead_letter_not_a_crash(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    import stream_app.core.triage as triage_module

    def broken(raw: bytes | None, **_: Any) -> Event:
        raise KeyError(f"secret payload {raw!r}")

    monkeypatch.setattr(triage_module, "parse_event", broken)
    verdict = triage(SETTINGS, SETTINGS.topic_clicks, None, b"review text here", LATE_CLOCK)
    assert verdict == Rejection("validator_error",
                                "validator error (KeyError); this is a bug in the engine, not the message")
    assert "validator bug: KeyError" in caplog.text
    assert "review text here" not in caplog.text and "secret payload" not in caplog.text


# -- properties ---------------------------------------------------------------------------------------

ids = st.text(string.ascii_letters + string.digits + "-_:.@", min_size=1, max_size=MAX_ID_CHARS)
words = st.text(min_size=1, max_size=200).filter(lambda s: bool(s.strip()) and not s.isspace())
times = st.one_of(st.integers(0, int(MAX_TS) - 1), st.floats(0, MAX_TS, exclude_max=True))
optional_category = st.one_of(st.none(), words)


@st.composite
def valid_events(draw: st.DrawFn) -> dict[str, Any]:
    event_type = draw(st.sampled_from(["click", "search", "review"]))
    doc: dict[str, Any] = {"event_id": draw(ids), "user_id": draw(ids), "ts": draw(times), "type": event_type}
    category = draw(optional_category)
    if category is not None:
        doc["category"] = category
    if event_type == "click":
        doc["item_id"] = draw(ids)
        dwell = draw(st.one_of(st.none(), st.integers(0, 10**9), st.floats(0, 1e9)))
        if dwell is not None:
            doc["dwell_ms"] = dwell
    elif event_type == "search":
        doc["query"] = draw(words)
    else:
        doc["item_id"] = draw(ids)
        doc["text"] = draw(words)
        rating = draw(st.one_of(st.none(), st.integers(1, 5)))
        if rating is not None:
            doc["rating"] = rating
    return doc


REQUIRED = {"click": ["event_id", "user_id", "ts", "type", "item_id"],
            "search": ["event_id", "user_id", "ts", "type", "query"],
            "review": ["event_id", "user_id", "ts", "type", "item_id", "text"]}
# orjson writes 64-bit integers only.
json_ints = st.integers(-(2**63), 2**64 - 1)
# Values of a JSON type that no field accepts where a string or number is expected.
WRONG_TYPES = st.one_of(st.lists(json_ints, max_size=3), st.dictionaries(st.text(max_size=3), json_ints, max_size=2))


def verdict_for(raw: bytes | None, event_type: str = "click", key: bytes | None = None) -> Event | Rejection:
    return triage(SETTINGS, TOPICS[event_type], key, raw, LATE_CLOCK)


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=2048), st.none()), st.sampled_from(["click", "search", "review"]),
       st.one_of(st.none(), st.binary(max_size=16)))
def test_arbitrary_bytes_never_raise(raw: bytes | None, event_type: str, key: bytes | None) -> None:
    assert isinstance(verdict_for(raw, event_type, key), Event | Rejection)


json_values = st.recursive(
    st.none() | st.booleans() | json_ints | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@hsettings(max_examples=300, deadline=None)
@given(valid_events(), st.sampled_from(["event_id", "user_id", "ts", "type", "item_id", "query", "text",
                                        "rating", "dwell_ms", "category", "extra"]), json_values)
def test_arbitrary_json_in_any_field_never_raises(doc: dict[str, Any], field: str, value: Any) -> None:
    assert isinstance(verdict_for(orjson.dumps({**doc, field: value}), doc["type"]), Event | Rejection)


@hsettings(max_examples=200, deadline=None)
@given(valid_events(), st.integers(0, 10_000), st.integers(0, 255))
def test_flipped_bytes_of_valid_events_never_raise(doc: dict[str, Any], position: int, byte: int) -> None:
    raw = bytearray(orjson.dumps(doc))
    raw[position % len(raw)] = byte
    assert isinstance(verdict_for(bytes(raw), doc["type"]), Event | Rejection)


@hsettings(max_examples=300, deadline=None)
@given(valid_events())
def test_valid_events_are_accepted_and_round_trip(doc: dict[str, Any]) -> None:
    raw = orjson.dumps(doc)
    event = verdict_for(raw, doc["type"], key=doc["user_id"].encode())
    assert isinstance(event, Event)
    assert (event.event_id, event.user_id, event.type) == (doc["event_id"], doc["user_id"], doc["type"])
    assert event.ts == float(doc["ts"])
    assert event.category == doc.get("category")
    assert (event.item_id, event.query, event.text) == (doc.get("item_id"), doc.get("query"), doc.get("text"))
    assert event.rating == doc.get("rating")
    assert event.dwell_ms == (None if doc.get("dwell_ms") is None else float(doc["dwell_ms"]))
    # What the ingest agent re-publishes is itself a valid event, equal to the first parse.
    assert verdict_for(event.to_json(), doc["type"]) == event


@hsettings(max_examples=300, deadline=None)
@given(valid_events(), st.data())
def test_dropping_a_required_field_is_rejected(doc: dict[str, Any], data: st.DataObject) -> None:
    field = data.draw(st.sampled_from(REQUIRED[doc["type"]]))
    del doc[field]
    verdict = verdict_for(orjson.dumps(doc), doc.get("type", "click"))
    assert verdict == Rejection("missing_field", f"missing field {field!r}")


@hsettings(max_examples=300, deadline=None)
@given(valid_events(), st.data(), WRONG_TYPES)
def test_a_field_of_the_wrong_type_is_rejected(doc: dict[str, Any], data: st.DataObject, value: Any) -> None:
    field = data.draw(st.sampled_from(sorted(set(doc) - {"type"})))
    event_type = doc["type"]
    doc[field] = value
    verdict = verdict_for(orjson.dumps(doc), event_type)
    assert isinstance(verdict, Rejection)
    assert verdict.reason.startswith(field)
    assert f"got {type(value).__name__}" in verdict.reason
    assert verdict.kind in ("wrong_type", "bad_timestamp", "bad_rating")


# -- bad clocks: the future-timestamp rule ------------------------------------------------------------------

NOW = 1_800_000_000.0  # an ingest clock (2027-01-15)


def test_an_event_more_than_max_future_past_the_ingest_clock_is_dead_lettered() -> None:
    limit = SETTINGS.max_future_s
    assert limit == 86400.0  # the documented default: one day
    just_in = orjson.dumps({"event_id": "e", "user_id": "u", "ts": NOW + limit, "type": "click", "item_id": "i"})
    just_out = orjson.dumps({"event_id": "e", "user_id": "u", "ts": NOW + limit + 1, "type": "click", "item_id": "i"})
    year_2199 = orjson.dumps({"event_id": "e", "user_id": "u", "ts": "2199-06-01T00:00:00Z", "type": "click",
                              "item_id": "i"})
    assert isinstance(triage(SETTINGS, TOPICS["click"], None, just_in, NOW), Event)
    assert triage(SETTINGS, TOPICS["click"], None, just_out, NOW) == Rejection(
        "future_timestamp", "ts 1800086401.0 is 86401 s past the wall clock at ingest (1800000000), "
                            "more than the 86400 s allowed")
    verdict = triage(SETTINGS, TOPICS["click"], None, year_2199, NOW)
    assert isinstance(verdict, Rejection) and verdict.kind == "future_timestamp"
    # The limit is a setting.
    tight = Settings(topic_clicks="clicks-t", topic_searches="searches-t", topic_reviews="reviews-t", max_future_s=60)
    assert triage(tight, TOPICS["click"], None, orjson.dumps({**orjson.loads(just_in), "ts": NOW + 61}), NOW) \
        == Rejection("future_timestamp", "ts 1800000061.0 is 61 s past the wall clock at ingest (1800000000), "
                                         "more than the 60 s allowed")


@hsettings(max_examples=300, deadline=None)
@given(valid_events(), st.floats(0, MAX_TS, exclude_max=True), st.floats(0, MAX_TS))
def test_what_an_ingest_clock_accepts_every_later_clock_accepts(doc: dict[str, Any], live: float,
                                                                  later_by: float) -> None:
    """Replay runs later than live, with a later wall clock: it never dead-letters what live accepted."""
    raw = orjson.dumps(doc)
    at_live = triage(SETTINGS, TOPICS[doc["type"]], None, raw, live)
    at_replay = triage(SETTINGS, TOPICS[doc["type"]], None, raw, live + later_by)
    if isinstance(at_live, Event):
        assert at_replay == at_live
    else:
        assert at_live.kind == "future_timestamp" and at_live.reason.startswith(f"ts {float(doc['ts'])!r}")
        assert float(doc["ts"]) > live + SETTINGS.max_future_s
