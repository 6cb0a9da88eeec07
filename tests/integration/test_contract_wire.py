"""The published contracts against a real worker: what lands on every topic validates against its schema.

Good events of all three types (epoch and ISO-8601 times, optional fields absent, null and set) and bad
messages of each input topic go through the embedded broker; the records the worker wrote to
`profile-deltas`, `dead-letters`, the internal by-user topic and the table changelog are then read back
and checked against the schemas the AsyncAPI document names for those channels.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
import pytest

from tests.contract_schemas import errors, message_schema
from tests.hostile_corpus import hostile_corpus
from tests.integration.conftest import Stack, eventually

pytestmark = pytest.mark.integration

TS = 1_700_000_000


def good_events() -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for i in range(12):
        user = f"wire-{i % 3}"
        base = {"event_id": f"good-{i}", "user_id": user, "ts": TS + i if i % 2 else f"2023-11-14T22:13:{i:02d}Z"}
        if i % 3 == 0:
            events.append({**base, "type": "click", "item_id": f"i{i}", "category": "shoes",
                           "dwell_ms": None if i % 2 else 1500})
        elif i % 3 == 1:
            events.append({**base, "type": "search", "query": f"red shoes size {i}", "category": None})
        else:
            events.append({**base, "type": "review", "item_id": f"i{i}", "text": "Comfortable and well made.",
                           **({"rating": 4} if i % 2 else {})})
    return events


BAD_CASES = ("truncated", "empty_bytes", "json_array_of_events", "type_uppercase", "unknown_field", "missing_ts",
             "long_event_id", "newline_in_user_id", "key_other_user", "ts_milliseconds", "search_on_clicks",
             "review_rating_six", "review_missing_text", "click_on_reviews")


def test_every_record_the_worker_writes_validates_against_its_channel_schema(stack: Stack) -> None:
    settings = stack.settings
    corpus = {case.name: case for case in hostile_corpus(settings)}
    bad = [corpus[name] for name in BAD_CASES]
    assert {case.topic for case in bad} == {"click", "search", "review"}
    good = good_events()
    assert {e["type"] for e in good} == {"click", "search", "review"}

    stack.start_worker()
    for case in bad:
        stack.produce_raw(case.topic_name(settings), case.value, case.key)
    stack.produce(good)
    stack.wait_for_events({e["event_id"] for e in good}, timeout_s=90)

    # -- profile-deltas: every value validates; the key is the value's user_id ----------------------------
    delta_schema = message_schema("profileDeltas", "payload")
    records = stack.records(settings.topic_deltas)
    assert records
    for record in records:
        delta = orjson.loads(record.value)
        assert errors(delta_schema, delta) == [], delta
        assert record.key == delta["user_id"].encode()
    counted = Counter(eid for r in records for eid in orjson.loads(r.value)["event_ids"])
    assert set(counted) == {e["event_id"] for e in good}
    reviewed = [orjson.loads(r.value) for r in records if "embedding" in orjson.loads(r.value)]
    assert reviewed and all("sentiment" in d for d in reviewed)  # the review path is covered on the wire

    # -- dead-letters: every record's headers validate against the channel's header schema ---------------
    header_schema = message_schema("deadLetters", "headers")

    def all_dead_letters_arrived() -> None:
        assert len(stack.records(settings.topic_dead_letters)) >= len(bad)

    eventually(all_dead_letters_arrived, timeout_s=30, interval_s=0.5)
    letters = stack.records(settings.topic_dead_letters)
    assert len(letters) == len(bad)
    expected = {(case.topic_name(settings), case.key, case.value or b""): case for case in bad}
    for letter in letters:
        headers = {name: value.decode() for name, value in letter.headers}
        assert errors(header_schema, headers) == [], headers
        case = expected.pop((headers["dlq.topic"], letter.key, letter.value or b""))
        assert headers["dlq.reason"] == case.reason
        assert headers["dlq.kind"] == case.kind
    assert not expected

    # -- internal topics: bundles and table state --------------------------------------------------------
    bundle_schema = message_schema("eventsByUser", "payload")
    bundles = stack.records(f"{settings.app_id}-events-by-user")
    assert bundles
    for record in bundles:
        assert record.key is None  # partition chosen explicitly, see the channel's key binding
        assert errors(bundle_schema, orjson.loads(record.value)) == []
    state_schema = message_schema("profilesChangelog", "payload")
    changelog = stack.records(f"{settings.app_id}-profiles-changelog")
    assert {r.key.decode() for r in changelog} == {e["user_id"] for e in good}
    for record in changelog:
        assert errors(state_schema, orjson.loads(record.value)) == []
