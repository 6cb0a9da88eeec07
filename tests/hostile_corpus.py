"""Messages a hostile or broken producer sends, each with the exact reason the engine must give.

Built from `Settings` because some reasons name the configured limits and topics. `topic` is the input
topic the message goes to ("click", "search" or "review" for the matching settings topic); review-topic
entries are only used by unit tests while the review path is being reworked.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import orjson

from stream_app.ops.settings import Settings

TS = 1_700_000_000
# A word that must never show up in logs: it stands for review text and other payload content.
CANARY = "zanzibar-canary-7Qx"


@dataclass(frozen=True)
class Hostile:
    name: str
    topic: str
    key: bytes | None
    value: bytes | None
    reason: str
    kind: str

    def topic_name(self, settings: Settings) -> str:
        return settings.topic_for(self.topic)


def click(**fields: Any) -> dict[str, Any]:
    doc = {"event_id": "h-click", "user_id": "mallory", "ts": TS, "type": "click", "item_id": "i1"}
    doc.update(fields)
    return {k: v for k, v in doc.items() if v is not None}


def search(**fields: Any) -> dict[str, Any]:
    return click(**{"type": "search", "item_id": None, "query": "red shoes", **fields})


def review(**fields: Any) -> dict[str, Any]:
    return click(**{"type": "review", "text": f"I loved it {CANARY}", "rating": 5, **fields})


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _with_raw(doc: dict[str, Any], field: str, raw: bytes) -> bytes:
    """The document with one field's JSON text replaced by `raw` (for values orjson cannot write)."""
    marker = "\x01marker\x01"
    return orjson.dumps({**doc, field: marker}).replace(orjson.dumps(marker), raw)


def hostile_corpus(settings: Settings) -> list[Hostile]:
    max_bytes, max_text = settings.max_event_bytes, settings.max_text_chars
    key = b"mallory"
    good_click = orjson.dumps(click())
    garbage = random.Random(7).randbytes(512)  # fixed seed: the reason names the first bad byte
    too_big = orjson.dumps(click(category="x" * (max_bytes + 10)))
    long_user = "u" * 5000
    cases = [
        # -- not JSON at all -------------------------------------------------------------------------
        Hostile("truncated", "click", key, good_click[:40],
                "not valid JSON: unexpected end of data: line 1 column 41 (char 40)", "malformed_json"),
        Hostile("truncated_string", "search", key, orjson.dumps(search())[:-10],
                "not valid JSON: unexpected end of data: line 1 column 85 (char 84)", "malformed_json"),
        Hostile("trailing_garbage", "click", key, good_click + b"}",
                "not valid JSON: unexpected content after document: line 1 column 89 (char 88)", "malformed_json"),
        Hostile("two_documents", "click", key, good_click + b"\n" + good_click,
                "not valid JSON: unexpected content after document: line 2 column 1 (char 89)", "malformed_json"),
        Hostile("binary_garbage", "click", None, garbage, "not valid JSON: invalid UTF-8 at byte 1", "malformed_json"),
        Hostile("schema_registry_framing", "click", key, b"\x00\x00\x00\x00\x01" + good_click,
                "not valid JSON: unexpected character, expected a JSON value: line 1 column 1 (char 0)",
                "malformed_json"),
        Hostile("invalid_utf8_in_string", "click", key, good_click.replace(b'"i1"', b'"i\xff1"'),
                "not valid JSON: invalid UTF-8 at byte 85", "malformed_json"),
        Hostile("overlong_utf8", "click", key, good_click.replace(b'"i1"', b'"\xc0\xaf"'),
                "not valid JSON: invalid UTF-8 at byte 84", "malformed_json"),
        Hostile("utf16", "click", key, good_click.decode().encode("utf-16"), "not valid JSON: invalid UTF-8 at byte 0",
                "malformed_json"),
        Hostile("utf8_bom", "click", key, b"\xef\xbb\xbf" + good_click,
                "not valid JSON: UTF-8 byte order mark (BOM) is not supported: line 1 column 1 (char 0)",
                "malformed_json"),
        Hostile("lone_surrogate", "click", key, good_click.replace(b'"i1"', b'"\\ud800"'),
                "not valid JSON: no low surrogate in string: line 1 column 85 (char 84)", "malformed_json"),
        Hostile("nan", "click", key, _with_raw(click(), "dwell_ms", b"NaN"),
                "not valid JSON: NaN/Infinity at character 99 is not a JSON number", "malformed_json"),
        Hostile("infinity", "click", key, _with_raw(click(), "dwell_ms", b"Infinity"),
                "not valid JSON: NaN/Infinity at character 99 is not a JSON number", "malformed_json"),
        Hostile("minus_infinity_ts", "click", key, _with_raw(click(), "ts", b"-Infinity"),
                "not valid JSON: NaN/Infinity at character 48 is not a JSON number", "malformed_json"),
        Hostile("number_overflow", "click", key, _with_raw(click(), "dwell_ms", b"1e999"),
                "not valid JSON: number is infinity when parsed as double: line 1 column 100 (char 99)",
                "malformed_json"),
        Hostile("deep_nesting", "click", key, nested(30_000), "not valid JSON: nested deeper than 1024 levels",
                "malformed_json"),
        Hostile("deep_nesting_in_field", "click", key, _with_raw(click(), "category", nested(2000)),
                "not valid JSON: nested deeper than 1024 levels", "malformed_json"),
        Hostile("deep_nesting_100k", "click", key, nested(100_000),
                f"message is 200000 bytes, over the limit of {max_bytes}", "too_large"),
        Hostile("control_bytes", "click", key, b"\x00\x01\x02\x03",
                "not valid JSON: unexpected character, expected a JSON value: line 1 column 1 (char 0)",
                "malformed_json"),
        Hostile("whitespace_only", "click", key, b"   \n",
                "not valid JSON: input data is empty: line 1 column 1 (char 0)", "malformed_json"),
        # -- empty values ----------------------------------------------------------------------------
        Hostile("empty_bytes", "click", key, b"", "empty message value", "empty"),
        Hostile("tombstone", "search", key, None, "empty message value", "empty"),
        Hostile("empty_user_id", "click", None, orjson.dumps(click(user_id="")), "user_id is empty", "empty_field"),
        Hostile("blank_item_id", "click", key, orjson.dumps(click(item_id="  \t")), "item_id is empty", "empty_field"),
        Hostile("empty_query", "search", key, orjson.dumps(search(query="")), "query is empty", "empty_field"),
        Hostile("empty_category", "click", key, orjson.dumps(click(category="")), "category is empty", "empty_field"),
        Hostile("null_event_id", "click", key, _with_raw(click(), "event_id", b"null"), "event_id is null",
                "missing_field"),
        # -- JSON, but not an event ------------------------------------------------------------------
        Hostile("json_null", "click", key, b"null", "event must be a JSON object, got null", "not_an_object"),
        Hostile("json_string", "click", key, b'"click"', "event must be a JSON object, got str", "not_an_object"),
        Hostile("json_array_of_events", "click", key, b"[" + good_click + b"]", "event must be a JSON object, got list",
                "not_an_object"),
        Hostile("empty_object", "click", key, b"{}", "missing field 'type'", "missing_field"),
        Hostile("type_uppercase", "click", key, orjson.dumps(click(type="CLICK")),
                "unknown event type 'CLICK'; expected click, search or review", "unknown_type"),
        Hostile("type_object", "click", key, orjson.dumps(click(type={"click": True})),
                "type must be a string, got dict", "wrong_type"),
        Hostile("type_deep_array", "click", key, _with_raw(click(), "type", nested(1000)),
                "type must be a string, got list", "wrong_type"),
        Hostile("missing_item_id", "click", key, orjson.dumps(click(item_id=None)), "missing field 'item_id'",
                "missing_field"),
        Hostile("missing_ts", "search", key, orjson.dumps(search(ts=None)), "missing field 'ts'", "missing_field"),
        # -- wrong types -----------------------------------------------------------------------------
        Hostile("ts_bool", "click", key, orjson.dumps(click(ts=True)),
                "ts must be epoch seconds or an ISO-8601 string, got a boolean", "bad_timestamp"),
        Hostile("ts_list", "click", key, orjson.dumps(click(ts=[TS])),
                "ts must be epoch seconds or an ISO-8601 string, got list", "bad_timestamp"),
        Hostile("ts_digits_string", "click", key, orjson.dumps(click(ts=str(TS))),
                "ts '1700000000' is not an ISO-8601 timestamp", "bad_timestamp"),
        Hostile("ts_no_zone", "search", key, orjson.dumps(search(ts="2023-11-14T22:13:20")),
                "ts '2023-11-14T22:13:20' has no time zone; event time must be unambiguous", "bad_timestamp"),
        Hostile("user_id_number", "click", key, orjson.dumps(click(user_id=42)), "user_id must be a string, got int",
                "wrong_type"),
        Hostile("item_id_object", "click", key, orjson.dumps(click(item_id={"id": 1})),
                "item_id must be a string, got dict", "wrong_type"),
        Hostile("query_list", "search", key, orjson.dumps(search(query=["red", "shoes"])),
                "query must be a string, got list", "wrong_type"),
        Hostile("dwell_string", "click", key, orjson.dumps(click(dwell_ms="1200")),
                "dwell_ms must be a number, got str", "wrong_type"),
        Hostile("dwell_bool", "click", key, orjson.dumps(click(dwell_ms=False)), "dwell_ms must be a number, got bool",
                "wrong_type"),
        Hostile("dwell_negative", "click", key, orjson.dumps(click(dwell_ms=-1)),
                "dwell_ms must be a finite, non-negative number", "wrong_type"),
        # -- unknown fields --------------------------------------------------------------------------
        Hostile("unknown_field", "click", key, orjson.dumps(click(admin=True)),
                "unknown field(s) for a click event: admin", "unknown_field"),
        Hostile("encoder_field_injected", "search", key, orjson.dumps(search(embedding=[0.1] * 8)),
                "unknown field(s) for a search event: embedding", "unknown_field"),
        Hostile("huge_field_name", "click", key, orjson.dumps(click(**{"k" * 5000: 1})),
                f"unknown field(s) for a click event: {'k' * 64}", "unknown_field"),
        # -- sizes -----------------------------------------------------------------------------------
        Hostile("over_event_bytes", "click", key, too_big,
                f"message is {len(too_big)} bytes, over the limit of {max_bytes}", "too_large"),
        Hostile("long_query", "search", key, orjson.dumps(search(query="q" * 2000)),
                "query is 2000 characters, over the limit of 1024", "too_large"),
        Hostile("long_event_id", "click", key, orjson.dumps(click(event_id="e" * 300)),
                "event_id is 300 characters, over the limit of 256", "too_large"),
        Hostile("long_user_id", "click", long_user.encode(), orjson.dumps(click(user_id=long_user)),
                "user_id is 5000 characters, over the limit of 256", "too_large"),
        # -- ids that would forge or break keys, paths and log lines ---------------------------------
        Hostile("newline_in_user_id", "click", b"mal\nERROR forged", orjson.dumps(click(user_id="mal\nERROR forged")),
                "user_id contains the control character U+000A", "bad_characters"),
        Hostile("nul_in_event_id", "search", key, orjson.dumps(search(event_id="e\x00")),
                "event_id contains the control character U+0000", "bad_characters"),
        # -- keys that disagree with the event -------------------------------------------------------
        Hostile("key_other_user", "click", b"bob", good_click, "message key does not match user_id", "key_mismatch"),
        Hostile("key_empty", "click", b"", good_click, "message key does not match user_id", "key_mismatch"),
        Hostile("key_binary", "search", b"\xff\xfe", orjson.dumps(search()), "message key does not match user_id",
                "key_mismatch"),
        # -- event time outside 1970..2200 -----------------------------------------------------------
        Hostile("ts_year_9999", "click", key, orjson.dumps(click(ts="9999-12-31T23:59:59+00:00")),
                "ts 253402300799.0 is outside 1970-01-01..2200-01-01", "bad_timestamp"),
        Hostile("ts_before_1970", "click", key, orjson.dumps(click(ts="1969-12-31T23:59:59Z")),
                "ts -1.0 is outside 1970-01-01..2200-01-01", "bad_timestamp"),
        Hostile("ts_negative", "search", key, orjson.dumps(search(ts=-86400)),
                "ts -86400.0 is outside 1970-01-01..2200-01-01", "bad_timestamp"),
        Hostile("ts_milliseconds", "click", key, orjson.dumps(click(ts=TS * 1000)),
                "ts 1700000000000.0 is outside 1970-01-01..2200-01-01", "bad_timestamp"),
        Hostile("ts_huge_integer", "click", key, _with_raw(click(), "ts", b"1" + b"0" * 40),
                "ts 1e+40 is outside 1970-01-01..2200-01-01", "bad_timestamp"),
        # -- valid events on the wrong topic ---------------------------------------------------------
        Hostile("search_on_clicks", "click", key, orjson.dumps(search()),
                f"a search event does not belong on topic {settings.topic_clicks!r} (expects click)", "wrong_topic"),
        Hostile("review_on_searches", "search", key, orjson.dumps(review()),
                f"a review event does not belong on topic {settings.topic_searches!r} (expects search)", "wrong_topic"),
        Hostile("malformed_review_with_canary", "click", key, orjson.dumps(review())[:-3],
                "not valid JSON: unexpected end of data: line 1 column 138 (char 137)", "malformed_json"),
        # -- malformed reviews (review topic: unit tests only for now) -------------------------------
        Hostile("review_text_too_long", "review", key, orjson.dumps(review(text="t" * (max_text + 1))),
                f"text is {max_text + 1} characters, over the limit of {max_text}", "too_large"),
        Hostile("review_rating_string", "review", key, orjson.dumps(review(rating="5")),
                "rating must be an integer 1-5, got str", "bad_rating"),
        Hostile("review_rating_bool", "review", key, orjson.dumps(review(rating=True)),
                "rating must be an integer 1-5, got bool", "bad_rating"),
        Hostile("review_rating_fraction", "review", key, orjson.dumps(review(rating=4.5)),
                "rating must be an integer 1-5, got 4.5", "bad_rating"),
        Hostile("review_rating_six", "review", key, orjson.dumps(review(rating=6)), "rating 6 is out of range 1-5",
                "bad_rating"),
        Hostile("review_rating_deep_array", "review", key, _with_raw(review(), "rating", nested(1000)),
                "rating must be an integer 1-5, got list", "bad_rating"),
        Hostile("review_missing_text", "review", key, orjson.dumps(review(text=None)), "missing field 'text'",
                "missing_field"),
        Hostile("review_text_number", "review", key, orjson.dumps(review(text=5)), "text must be a string, got int",
                "wrong_type"),
        Hostile("review_sentiment_injected", "review", key, orjson.dumps(review(sentiment=1.0)),
                "unknown field(s) for a review event: sentiment", "unknown_field"),
        Hostile("click_on_reviews", "review", key, good_click,
                f"a click event does not belong on topic {settings.topic_reviews!r} (expects review)", "wrong_topic"),
    ]
    names = [case.name for case in cases]
    assert len(names) == len(set(names)), "corpus names must be unique"
    return cases
