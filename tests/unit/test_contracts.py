"""The published contracts (schemas/*.schema.json, schemas/asyncapi.yaml) are well-formed and agree with the code.

Agreement is checked both ways wherever JSON Schema can express the rule: a message the engine accepts is
valid per its channel's schema, and a message the engine refuses for a document-level reason is invalid per
it. What JSON Schema cannot express (byte size, JSON syntax, key == user_id, parts of the ISO-8601 grammar)
is pinned explicitly below, so a change on either side shows up here.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any
from urllib.parse import urldefrag

import orjson
import pytest
from hypothesis import HealthCheck, assume, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from schemas.events import MAX_FIELD_CHARS, MAX_ID_CHARS, MAX_TS, MIN_TS, REJECT_KINDS, Event, parse_event
from stream_app.core.profile import ProfileParams, ProfileState, apply
from stream_app.core.pseudonym import pseudonym
from stream_app.core.triage import Rejection, triage
from stream_app.encoding.encoder import FakeEncoder
from stream_app.ops.settings import Settings
from stream_app.worker.publish import dead_letter_headers
from tests.contract_schemas import (
    ASYNCAPI,
    SCHEMA_DIR,
    asyncapi,
    channel_message,
    deref,
    errors,
    message_schema,
    refs,
    registry,
    resolve_asyncapi,
    schema_files,
)
from tests.hostile_corpus import hostile_corpus

SETTINGS = Settings()
CHANNEL_OF = {"click": "clicks", "search": "searches", "review": "reviews"}
TOPIC_OF = {"click": SETTINGS.topic_clicks, "search": SETTINGS.topic_searches, "review": SETTINGS.topic_reviews}
EXPECTED_FILES = {"common", "click", "search", "review", "delta", "events-by-user", "profile-state",
                  "dead-letter-headers"}


def code_accepts(doc: Any, event_type: str, key: bytes | None = None) -> bool:
    """The engine's verdict for a document on `event_type`'s topic (triage: validation and topic check).

    Read with the ingest clock at the end of the accepted range, where no event is in the future: the schema
    describes the document, and the future-timestamp rule depends on the clock, not on the document."""
    return not isinstance(triage(SETTINGS, TOPIC_OF[event_type], key, orjson.dumps(doc), MAX_TS), Rejection)


def schema_accepts(doc: Any, event_type: str) -> bool:
    # python-jsonschema repr()s the offending value into its error message: for the corpus's 1000-deep
    # arrays that needs more than Python's default recursion limit (a validator limitation, not the schema's).
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20_000))
    try:
        return not errors(message_schema(CHANNEL_OF[event_type], "payload"), doc)
    finally:
        sys.setrecursionlimit(limit)


# -- the files themselves --------------------------------------------------------------------------------

def test_the_expected_schema_files_exist_and_each_is_a_valid_2020_12_schema() -> None:
    files = schema_files()
    assert {name.removesuffix(".schema.json") for name in files} == EXPECTED_FILES
    for name, doc in files.items():
        Draft202012Validator.check_schema(doc)
        assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema", name
        assert doc["$id"].endswith(f"/v1/{name}"), name


def test_every_ref_in_the_schema_files_resolves() -> None:
    checked = 0
    for name, doc in schema_files().items():
        resolver = registry().resolver(base_uri=doc["$id"])
        for ref in refs(doc):
            resolver.lookup(ref)  # raises Unresolvable
            target = urldefrag(ref)[0]
            assert target == "" or (SCHEMA_DIR / target).is_file(), f"{name}: {ref}"
            checked += 1
    assert checked > 20


def test_asyncapi_document_parses_is_version_3_and_every_ref_resolves() -> None:
    doc = asyncapi()
    assert str(doc["asyncapi"]).startswith("3.")
    assert doc["info"]["version"].startswith("1.")
    all_refs = list(refs(doc))
    assert len(all_refs) > 30
    for ref in all_refs:
        target, fragment = urldefrag(ref)
        if target:
            assert (ASYNCAPI.parent / target).is_file(), ref
        assert resolve_asyncapi(ref) is not None, ref


def test_asyncapi_describes_every_topic_with_the_configured_default_names() -> None:
    channels = {name: deref(channel) for name, channel in asyncapi()["channels"].items()}
    app_id = asyncapi()["components"]["parameters"]["appId"]["default"]
    assert app_id == SETTINGS.app_id
    addresses = {name: channel["address"].replace("{appId}", app_id) for name, channel in channels.items()}
    assert addresses == {
        "clicks": SETTINGS.topic_clicks, "searches": SETTINGS.topic_searches, "reviews": SETTINGS.topic_reviews,
        "deadLetters": SETTINGS.topic_dead_letters, "profileDeltas": SETTINGS.topic_deltas,
        "eventsByUser": f"{SETTINGS.app_id}-events-by-user",
        "profilesChangelog": f"{SETTINGS.app_id}-profiles-changelog",
    }
    internal = {name for name, channel in channels.items()
                if any(deref(tag)["name"] == "internal" for tag in channel.get("tags", []))}
    assert internal == {"eventsByUser", "profilesChangelog"}
    changelog_binding = channels["profilesChangelog"]["bindings"]["kafka"]
    assert changelog_binding["topicConfiguration"]["cleanup.policy"] == ["compact"]
    for name in channels:
        message = channel_message(name)
        assert "payload" in message and "kafka" in message["bindings"], name
    # Operations: each names a channel and only messages of that channel; every channel is used.
    used = set()
    for op_name, operation in asyncapi()["operations"].items():
        assert operation["action"] in ("send", "receive"), op_name
        channel_ref = operation["channel"]["$ref"]
        used.add(channel_ref.rsplit("/", 1)[1])
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/"), op_name
    assert used == set(channels)


def test_input_channels_use_the_event_schemas_and_outputs_theirs() -> None:
    ids = {name: doc["$id"] for name, doc in schema_files().items()}
    assert message_schema("clicks", "payload") == {"$ref": ids["click.schema.json"]}
    assert message_schema("searches", "payload") == {"$ref": ids["search.schema.json"]}
    assert message_schema("reviews", "payload") == {"$ref": ids["review.schema.json"]}
    assert message_schema("profileDeltas", "payload") == {"$ref": ids["delta.schema.json"]}
    assert message_schema("eventsByUser", "payload") == {"$ref": ids["events-by-user.schema.json"]}
    assert message_schema("profilesChangelog", "payload") == {"$ref": ids["profile-state.schema.json"]}
    assert message_schema("deadLetters", "headers") == {"$ref": ids["dead-letter-headers.schema.json"]}


# -- constants in the schemas are the code's constants ---------------------------------------------------

def test_schema_bounds_are_the_codes_constants() -> None:
    common = schema_files()["common.schema.json"]["$defs"]
    assert (common["epochSeconds"]["minimum"], common["epochSeconds"]["exclusiveMaximum"]) == (MIN_TS, MAX_TS)
    assert common["id"]["maxLength"] == MAX_ID_CHARS
    assert common["field"]["maxLength"] == MAX_FIELD_CHARS
    review = schema_files()["review.schema.json"]["properties"]
    assert review["text"]["maxLength"] == SETTINGS.max_text_chars
    assert (review["rating"]["minimum"], review["rating"]["maximum"]) == (1, 5)


def test_dead_letter_headers_are_what_the_code_writes_and_kinds_are_the_metric_labels() -> None:
    schema = schema_files()["dead-letter-headers.schema.json"]
    assert schema["properties"]["dlq.kind"]["enum"] == list(REJECT_KINDS)
    message = SimpleNamespace(topic="clicks", partition=3, offset=12345)
    for case in hostile_corpus(SETTINGS):
        written = dead_letter_headers(Rejection(case.kind, case.reason), message)  # type: ignore[arg-type]
        headers = {name: value.decode() for name, value in written}
        assert set(headers) == set(schema["required"]), case.name
        assert errors(schema, headers) == [], case.name
        assert headers["dlq.kind"] == case.kind
    good = {"dlq.kind": "bad_rating", "dlq.reason": "x", "dlq.topic": "clicks", "dlq.partition": "0",
            "dlq.offset": "7"}
    for bad in ({**good, "dlq.partition": "-1"}, {**good, "dlq.offset": "7\n"}, {**good, "dlq.kind": "typo"},
                {**good, "dlq.reason": " "}, {k: v for k, v in good.items() if k != "dlq.topic"},
                {k: v for k, v in good.items() if k != "dlq.kind"}):
        assert errors(schema, bad), bad


# -- the hostile corpus ------------------------------------------------------------------------------------

# Refusals that depend on the bytes or the key, not on the decoded document: no JSON Schema can state them.
BYTE_LEVEL_KINDS = {"malformed_json", "empty", "too_large"}


def test_every_document_level_refusal_of_the_hostile_corpus_is_refused_by_the_schema() -> None:
    document_level = 0
    for case in hostile_corpus(SETTINGS):
        raw = case.value
        if raw is None or raw == b"" or len(raw) > SETTINGS.max_event_bytes:
            assert case.kind in BYTE_LEVEL_KINDS, case.name
            continue
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            assert case.kind == "malformed_json", case.name
            continue
        if case.kind == "key_mismatch":
            # The document itself is a valid event: only the key (not expressible) is wrong.
            assert schema_accepts(doc, case.topic), case.name
            continue
        assert not schema_accepts(doc, case.topic), f"{case.name}: {case.reason}"
        document_level += 1
    assert document_level >= 45


# -- generated events: the code and the schema give the same verdict --------------------------------------

ids = st.text(st.characters(codec="utf-8", exclude_categories=["Cc"]), min_size=1, max_size=MAX_ID_CHARS)
words = st.text(st.characters(codec="utf-8"), min_size=1, max_size=80)
epoch = st.one_of(st.integers(0, int(MAX_TS) - 1), st.floats(0, MAX_TS, exclude_max=True))
iso = st.builds(
    lambda y, mo, d, h, mi, s, frac, zone: f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}{frac}{zone}",
    st.integers(1971, 2198), st.integers(1, 12), st.integers(1, 28), st.integers(0, 23), st.integers(0, 59),
    st.integers(0, 59), st.sampled_from(["", ".5", ".123456", ".1234567"]),
    st.sampled_from(["Z", "+00:00", "+05:30", "-08:00", "+23:59", "-23:59"]),
)


@st.composite
def valid_events(draw: st.DrawFn, event_type: str | None = None) -> dict[str, Any]:
    kind = event_type or draw(st.sampled_from(["click", "search", "review"]))
    doc: dict[str, Any] = {"event_id": draw(ids), "user_id": draw(ids), "ts": draw(st.one_of(epoch, iso)),
                           "type": kind}
    maybe = st.one_of(st.just("absent"), st.none())
    doc["category"] = draw(st.one_of(maybe, words))
    if kind == "click":
        doc["item_id"] = draw(ids)
        doc["dwell_ms"] = draw(st.one_of(maybe, st.integers(0, 2**63), st.floats(0, 1e12)))
    elif kind == "search":
        doc["query"] = draw(words)
    else:
        doc["item_id"] = draw(ids)
        doc["text"] = draw(words)
        doc["rating"] = draw(st.one_of(maybe, st.integers(1, 5), st.sampled_from([1.0, 3.0, 5.0])))
    doc = {k: v for k, v in doc.items() if v != "absent"}
    # Blank strings are invalid; the generator is for valid events.
    assume(all(not isinstance(v, str) or v.strip() for v in doc.values()))
    return doc


@hsettings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(valid_events())
def test_generated_valid_events_are_accepted_by_the_code_and_the_schema(doc: dict[str, Any]) -> None:
    assert code_accepts(doc, doc["type"], key=doc["user_id"].encode())
    assert errors(message_schema(CHANNEL_OF[doc["type"]], "payload"), doc) == []


json_ints = st.integers(-(2**63), 2**64 - 1)
json_values = st.recursive(
    st.none() | st.booleans() | json_ints | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20) | st.sampled_from(["", " ", "\u3000", "\x1c", "\ufeff", "a\n", "\x85", "x" * 257]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)
FIELDS = ["event_id", "user_id", "ts", "type", "item_id", "query", "text", "rating", "dwell_ms", "category",
          "sentiment", "embedding", "extra"]


def mutate(doc: dict[str, Any], field: str, value: Any, action: str) -> dict[str, Any]:
    if action == "drop":
        return {k: v for k, v in doc.items() if k != field}
    return {**doc, field: value}


@hsettings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(valid_events(), st.sampled_from(FIELDS), json_values, st.sampled_from(["set", "drop"]),
       st.sampled_from(["click", "search", "review"]))
def test_any_change_to_a_valid_event_gets_the_same_verdict_from_the_code_and_the_schema(
    doc: dict[str, Any], field: str, value: Any, action: str, topic: str
) -> None:
    """Wrong types, nulls, missing, unknown and injected fields, blank or long strings, out-of-range numbers,
    other types' events on a topic: whatever the change, the schema of the topic agrees with the engine.
    ts strings are excluded (the ISO grammar is pinned by the tests below)."""
    changed = mutate(doc, field, value, action)
    assume(not (isinstance(changed.get("ts"), str)))
    assert code_accepts(changed, topic) == schema_accepts(changed, topic), (changed, topic)


# -- boundaries --------------------------------------------------------------------------------------------

def event_with(event_type: str = "click", **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"event_id": "e1", "user_id": "u1", "ts": 1_700_000_000, "type": event_type}
    doc.update({"click": {"item_id": "i1"}, "search": {"query": "red shoes"},
                "review": {"item_id": "i1", "text": "Lovely"}}[event_type])
    doc.update(fields)
    return doc


BOUNDARIES: list[tuple[str, dict[str, Any], bool]] = [
    # ts as a number: [1970-01-01, 2200-01-01)
    ("ts_zero", event_with(ts=0), True),
    ("ts_negative_zero", event_with(ts=-0.0), True),
    ("ts_just_below_zero", event_with(ts=-1e-9), False),
    ("ts_last_second", event_with(ts=int(MAX_TS) - 1), True),
    ("ts_last_float", event_with(ts=7258118399.999999), True),
    ("ts_max", event_with(ts=int(MAX_TS)), False),
    ("ts_max_float", event_with(ts=MAX_TS), False),
    ("ts_milliseconds", event_with(ts=1_700_000_000_000), False),
    ("ts_bool", event_with(ts=True), False),
    ("ts_null", event_with(ts=None), False),
    # ts as a string inside the published profile
    ("ts_iso_first_instant", event_with(ts="1970-01-01T00:00:00Z"), True),
    ("ts_iso_last_second", event_with(ts="2199-12-31T23:59:59Z"), True),
    ("ts_iso_last_fraction", event_with(ts="2199-12-31T23:59:59.999999Z"), True),
    ("ts_iso_space_separator", event_with(ts="2023-11-14 22:13:20+00:00"), True),
    ("ts_iso_offset", event_with(ts="2023-11-14T23:13:20+01:00"), True),
    ("ts_iso_bound", event_with(ts="2200-01-01T00:00:00Z"), False),
    ("ts_iso_before_1970", event_with(ts="1969-12-31T23:59:59Z"), False),
    ("ts_iso_no_zone", event_with(ts="2023-11-14T22:13:20"), False),
    ("ts_iso_date_only", event_with(ts="2023-11-14"), False),
    ("ts_iso_lower_case", event_with(ts="2023-11-14t22:13:20z"), False),
    ("ts_iso_hour_24", event_with(ts="2023-11-14T24:00:00Z"), False),
    ("ts_iso_leap_second", event_with(ts="2016-12-31T23:59:60Z"), False),
    ("ts_iso_offset_24h", event_with(ts="2023-11-14T22:13:20+24:00"), False),
    ("ts_iso_trailing_newline", event_with(ts="2023-11-14T22:13:20Z\n"), False),
    ("ts_digits_string", event_with(ts="1700000000"), False),
    # rating: integer 1-5, or null/absent
    ("rating_0", event_with("review", rating=0), False),
    ("rating_1", event_with("review", rating=1), True),
    ("rating_5", event_with("review", rating=5), True),
    ("rating_6", event_with("review", rating=6), False),
    ("rating_5_0", event_with("review", rating=5.0), True),
    ("rating_4_5", event_with("review", rating=4.5), False),
    ("rating_true", event_with("review", rating=True), False),
    ("rating_string", event_with("review", rating="5"), False),
    ("rating_null", event_with("review", rating=None), True),
    # dwell_ms: finite, non-negative, or null/absent
    ("dwell_zero", event_with(dwell_ms=0), True),
    ("dwell_negative_zero", event_with(dwell_ms=-0.0), True),
    ("dwell_tiny_negative", event_with(dwell_ms=-1e-300), False),
    ("dwell_huge", event_with(dwell_ms=1e308), True),
    ("dwell_null", event_with(dwell_ms=None), True),
    # lengths in code points
    ("id_256", event_with(user_id="u" * 256), True),
    ("id_257", event_with(user_id="u" * 257), False),
    ("id_256_astral", event_with(user_id="\U0001f600" * 256), True),
    ("id_257_astral", event_with(user_id="\U0001f600" * 257), False),
    ("category_1024", event_with(category="c" * 1024), True),
    ("category_1025", event_with(category="c" * 1025), False),
    ("query_1024", event_with("search", query="q" * 1024), True),
    ("query_1025", event_with("search", query="q" * 1025), False),
    ("text_max", event_with("review", text="t" * SETTINGS.max_text_chars), True),
    ("text_over_max", event_with("review", text="t" * (SETTINGS.max_text_chars + 1)), False),
    # blank strings: Python's whitespace set, exactly
    ("id_ideographic_space", event_with(item_id="\u3000"), False),
    ("id_nbsp", event_with(item_id="\xa0"), False),
    ("id_bom_is_not_blank", event_with(item_id="\ufeff"), True),
    ("category_file_separator_is_blank", event_with(category="\x1c\x1d"), False),
    ("category_next_line_is_blank", event_with(category="\x85"), False),
    ("category_zero_width_space_is_not_blank", event_with(category="\u200b"), True),
    ("text_blank", event_with("review", text=" \t\n"), False),
    # control characters: refused in ids only
    ("id_trailing_newline", event_with(user_id="u1\n"), False),
    ("id_del", event_with(event_id="e\x7f"), False),
    ("id_c1_control", event_with(event_id="e\x9f"), False),
    ("id_just_after_c1", event_with(event_id="e\xa0"), True),
    ("category_with_control", event_with(category="shoes\x00\n"), True),
    ("query_with_newline", event_with("search", query="red\nshoes"), True),
    # fields and types
    ("category_null", event_with(category=None), True),
    ("required_null", event_with(item_id=None), False),
    ("unknown_field_null", event_with(color=None), False),
    ("query_on_click", event_with(query="x"), False),
    ("sentiment_injected", event_with("review", sentiment=0.5), False),
    ("unknown_type", event_with(type="purchase"), False),
]


@pytest.mark.parametrize(("doc", "valid"), [(doc, valid) for _, doc, valid in BOUNDARIES],
                         ids=[name for name, _, _ in BOUNDARIES])
def test_boundaries_get_the_same_verdict_from_the_code_and_the_schema(doc: dict[str, Any], valid: bool) -> None:
    assert code_accepts(doc, doc["type"] if doc["type"] in TOPIC_OF else "click") == valid
    assert schema_accepts(doc, doc["type"] if doc["type"] in TOPIC_OF else "click") == valid


# What JSON Schema cannot say about the ts string, pinned: (value, engine accepts, schema accepts).
ISO_DIVERGENCES: list[tuple[str, bool, bool]] = [
    # calendar validity
    ("2023-02-29T00:00:00Z", False, True),
    ("2023-04-31T00:00:00Z", False, True),
    # the 1970..2200 bound applies to the instant, the pattern can only bound the local year
    ("1970-01-01T00:30:00+01:00", False, True),
    ("2199-12-31T23:30:00-01:00", False, True),
    ("1969-12-31T23:30:00-01:00", True, False),
    ("2200-01-01T00:30:00+01:00", True, False),
    # forms Python's datetime.fromisoformat accepts beyond the published RFC 3339 profile
    ("20231114T221320Z", True, False),
    ("2023-W46-2T22:13:20Z", True, False),
    ("2023-11-14T22Z", True, False),
    ("2023-11-14T22:13Z", True, False),
    ("2023-11-14T22:13:20+01", True, False),
    ("2023-11-14T22:13:20+0100", True, False),
    ("2023-11-14X22:13:20+00:00", True, False),
    ("2023-11-14T22:13:20,5Z", True, False),
    ("2023-11-14T22:13:20.Z", True, False),
    ("2023-11-14T22:13:20 +01:00", True, False),
]


@pytest.mark.parametrize(("ts", "engine", "schema"), ISO_DIVERGENCES, ids=[ts for ts, _, _ in ISO_DIVERGENCES])
def test_the_known_ts_string_divergences_are_exactly_as_documented(ts: str, engine: bool, schema: bool) -> None:
    doc = event_with(ts=ts)
    assert (code_accepts(doc, "click"), schema_accepts(doc, "click")) == (engine, schema)


@hsettings(max_examples=400, deadline=None)
@given(st.from_regex(schema_files()["common.schema.json"]["$defs"]["isoTimestamp"]["pattern"], fullmatch=True))
def test_every_ts_string_the_schema_accepts_is_accepted_by_the_engine_away_from_documented_gaps(ts: str) -> None:
    doc = event_with(ts=ts)
    assume(schema_accepts(doc, "click"))
    year, month, day = int(ts[:4]), int(ts[5:7]), int(ts[8:10])
    assume(day <= 28 or (month != 2 and (day <= 30 or month in (1, 3, 5, 7, 8, 10, 12))))  # calendar
    assume(ts[:10] not in ("1970-01-01", "2199-12-31"))  # offsets may cross the instant bound
    assert 1970 <= year < 2200
    assert code_accepts(doc, "click"), ts


# -- deltas, bundles and table state from the pure code ---------------------------------------------------

DELTA_KEYS = set(schema_files()["delta.schema.json"]["properties"])
STATE_ENCODER = FakeEncoder(dimension=4)


def enriched(event: Event) -> Event:
    """A review as the encoder stage hands it on: text dropped, sentiment and embedding added."""
    if event.type != "review":
        return event
    encoded = STATE_ENCODER._encode(event.text or "")
    return dataclasses.replace(event, text=None, sentiment=encoded.sentiment, embedding=encoded.embedding)


def parsed(doc: dict[str, Any]) -> Event:
    return parse_event(orjson.dumps(doc), max_event_bytes=SETTINGS.max_event_bytes,
                       max_text_chars=SETTINGS.max_text_chars)


def check_delta(delta: dict[str, Any]) -> None:
    wire = orjson.loads(orjson.dumps(delta))  # what publish_delta writes
    assert errors("delta.schema.json", wire) == [], wire
    undeclared = set(wire) - DELTA_KEYS
    assert not undeclared, f"the code emits delta fields the schema does not declare: {undeclared}"


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.lists(st.lists(valid_events(), min_size=1, max_size=12), min_size=1, max_size=5), st.data())
def test_deltas_redeliveries_bundles_and_table_state_from_the_code_validate(
    batches: list[list[dict[str, Any]]], data: st.DataObject
) -> None:
    params = ProfileParams(half_life_s=data.draw(st.sampled_from([60.0, 604800.0])),
                           weights={"click": 1.0, "search": 2.0, "review": 0.0}, top_k=2, dedup_window=16,
                           redelivery_window=3)
    profile = ProfileState(user_id="u1")
    seen: list[Event] = []
    kinds: set[str] = set()
    for batch in batches:
        events = [enriched(parsed({**doc, "user_id": "u1"})) for doc in batch]
        if seen:  # redeliver some already counted events with the new ones
            events += data.draw(st.lists(st.sampled_from(seen), max_size=3))
        assert errors("events-by-user.schema.json", [orjson.loads(e.to_json()) for e in events]) == []
        result = apply(profile, events, params)
        for delta in ([result.delta] if result.delta else []) + result.redeliveries:
            check_delta(delta)
            check_delta({**delta, "user_id": pseudonym(b"a-key-of-16-chars!", delta["user_id"])})
            kinds |= set(delta)
        seen += events
        assert errors("profile-state.schema.json", orjson.loads(orjson.dumps(profile.to_dict()))) == []
    assert "activity" in kinds


def test_a_delta_with_drops_rescale_underflow_and_redeliveries_validates() -> None:
    """The corners hypothesis may miss: top-K drops, a landmark move, means whose weight underflows to 0."""
    # A window of 3 keeps the first delta for re-emission (the default keeps only the newest).
    params = ProfileParams(half_life_s=60.0, weights={"click": 1.0, "search": 2.0, "review": 3.0}, top_k=1,
                           redelivery_window=3)
    profile = ProfileState(user_id="u1")
    first = [parsed(event_with("search", event_id=f"s{i}", query=f"word{i} other{i}", category=f"c{i}", ts=1e9))
             for i in range(3)]
    deltas: list[dict[str, Any]] = []
    checks: list[Callable[[dict[str, Any]], bool]] = [
        lambda d: "dropped" in d and set(d["dropped"]) == {"interests", "keywords"},
        lambda d: d["landmark"] == 2e9,  # rescaled: 1e9 s later is far more than 64 half-lives
        lambda d: d["rating"][1] == 0.0 and d["embedding"]["den"] == 0.0,  # a 1970 review underflows to 0
    ]
    for events in (first, [parsed(event_with(event_id="late", ts=2e9, category="c9"))],
                   [enriched(parsed(event_with("review", event_id="old", ts=0, rating=4)))]):
        result = apply(profile, events, params)
        assert result.delta is not None
        deltas.append(result.delta)
    for delta, check in zip(deltas, checks, strict=True):
        check_delta(delta)
        assert check(delta), delta
    again = apply(profile, first[:1], params)
    assert again.delta is None and again.redeliveries == [deltas[0]]
    check_delta(again.redeliveries[0])
    assert errors("profile-state.schema.json", orjson.loads(orjson.dumps(profile.to_dict()))) == []


def test_the_delta_schema_refuses_what_a_consumer_could_not_apply() -> None:
    params = ProfileParams(half_life_s=60.0, weights={"click": 1.0, "search": 2.0, "review": 3.0})
    delta = apply(ProfileState(user_id="u1"), [parsed(event_with(category="shoes"))], params).delta
    assert delta is not None and errors("delta.schema.json", delta) == []
    for bad in ({**delta, "version": 0}, {**delta, "event_ids": []}, {**delta, "half_life_s": 0},
                {**delta, "activity": {"purchase": 1.0}}, {**delta, "interests": {"shoes": -1.0}},
                {**delta, "rating": [1.0]}, {**delta, "embedding": {"num": [0.1]}},
                {k: v for k, v in delta.items() if k != "landmark"}, {**delta, "as_of": MAX_TS}):
        assert errors("delta.schema.json", bad), bad


def test_a_first_batch_spanning_more_than_1024_half_lives_gives_a_finite_valid_delta() -> None:
    """Was a strict xfail: the landmark was the batch's oldest event and 2^((t - L)/H) overflowed."""
    params = ProfileParams(half_life_s=SETTINGS.half_life_s, weights={"click": 1.0, "search": 2.0, "review": 3.0})
    events = [parsed(event_with(event_id="old", ts="1971-01-01T00:00:00Z")), parsed(event_with(event_id="new"))]
    profile = ProfileState(user_id="u1")
    delta = apply(profile, events, params).delta
    assert delta is not None
    check_delta(delta)
    # The landmark is the newest event; the 1971 click is ~2800 half-lives older and weighs exactly 0.
    assert delta["landmark"] == events[1].ts and delta["activity"] == {"click": 1.0}
    assert errors("profile-state.schema.json", orjson.loads(orjson.dumps(profile.to_dict()))) == []
