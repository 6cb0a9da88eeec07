"""Every record the engine writes fits `PROFILE_MAX_RECORD_BYTES`: deltas, table values, bundles, dead letters."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import Event, event_from_trusted_doc
from stream_app.core import fold, limits
from stream_app.core.limits import delta_budget, json_size, split_rounds
from stream_app.core.profile import ProfileParams, ProfileState, ProfileTooLarge, apply, bound_record
from stream_app.core.replica import ProfileReplicas
from stream_app.worker.publish import bounded_dead_letter, pack_bundles
from tests.oracle import assert_close_maps

LIMIT = 64 * 1024
WEIGHTS = {"click": 1.0, "search": 2.0, "review": 3.0}


def bot_user_events(user: str = "bot") -> list[Event]:
    """2,000 clicks of distinct categories and 300 searches of 40 distinct terms each."""
    events = [Event(f"{user}-c{i:05d}-{'x' * 30}", user, 1.7e9 + i, "click", category=f"category-{i:05d}",
                    item_id="i") for i in range(2000)]
    events += [Event(f"{user}-s{i:05d}-{'x' * 30}", user, 1.7e9 + 2000 + i, "search",
                     query=" ".join(f"term{i:03d}w{j:02d}" for j in range(40))) for i in range(300)]
    return events


def fold_in_rounds(events: list[Event], params: ProfileParams,
                   table: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The worker's fold (`Folder.fold`), with a dict as the table: each round written before the next."""
    deltas: list[dict[str, Any]] = []
    for folded in fold.fold_in_rounds(events, table.get, params):
        assert not folded.failures and not folded.oversize
        table.update(folded.writes)
        deltas.extend(delta for delta, _ in folded.deltas)
    return deltas


def test_a_big_batch_of_one_user_becomes_consecutive_deltas_within_the_budget_and_exact_for_replicas() -> None:
    params = ProfileParams(half_life_s=7 * 86400.0, weights=WEIGHTS, top_k=50, max_record_bytes=LIMIT)
    events = bot_user_events() + [Event("other-1", "other", 1.7e9, "click", category="shoes", item_id="i")]
    table: dict[str, dict[str, Any]] = {}
    deltas = fold_in_rounds(events, params, table)

    unlimited_params = ProfileParams(half_life_s=7 * 86400.0, weights=WEIGHTS, top_k=50, max_record_bytes=10**9)
    whole = json_size(apply(ProfileState("bot"), bot_user_events(), unlimited_params).delta)
    assert whole > 4 * LIMIT  # one delta for the batch would be far over the limit
    bot_deltas = [d for d in deltas if d["user_id"] == "bot"]
    assert [d["version"] for d in bot_deltas] == list(range(1, len(bot_deltas) + 1))
    assert len(bot_deltas) > 10
    assert max(json_size(d) for d in deltas) <= delta_budget(LIMIT)
    for user_id, value in table.items():
        assert len(user_id.encode()) + json_size(value) <= LIMIT - 128

    replicas = ProfileReplicas().apply_all(deltas)
    assert replicas.gaps == []
    for user_id, value in table.items():
        assert replicas.profiles[user_id].view() == ProfileState.from_dict(value).view()

    # The same profile as folding the whole batch at once (no limit), up to float rounding.
    unlimited = ProfileState("bot")
    apply(unlimited, bot_user_events(), unlimited_params)
    split_view, whole_view = ProfileState.from_dict(table["bot"]).view(), unlimited.view()
    for name in ("activity", "interests", "keywords"):
        assert_close_maps(split_view[name], whole_view[name])


def test_a_redelivered_batch_re_emits_the_newest_delta_from_the_trimmed_outbox() -> None:
    # An operator's larger window (the default keeps only the newest): the record limit trims it, newest kept.
    params = ProfileParams(half_life_s=7 * 86400.0, weights=WEIGHTS, top_k=50, max_record_bytes=LIMIT,
                           redelivery_window=8)
    table: dict[str, dict[str, Any]] = {}
    events = bot_user_events()
    deltas = fold_in_rounds(events, params, table)
    state = ProfileState.from_dict(table["bot"])
    assert 1 <= len(state.outbox) < params.redelivery_window  # trimmed by bytes, newest kept
    assert state.outbox[-1] == deltas[-1]
    # A crash lost the newest delta; the events come again: it is re-emitted, nothing is counted twice.
    again = fold_in_rounds(events[-1:], params, table)
    assert again == [deltas[-1]]
    assert ProfileState.from_dict(table["bot"]).version == deltas[-1]["version"]


def test_a_delta_between_the_budget_and_the_record_limit_is_cut_into_versions_that_fit() -> None:
    # 60 clicks of distinct 300-character categories: a ~20 KB delta, over the 16 KB budget of a 64 KB limit,
    # yet small enough that the profile could hold it: only its measured size sends the user to pieces.
    params = ProfileParams(half_life_s=86400.0, weights=WEIGHTS, top_k=500, max_record_bytes=LIMIT)
    events = [Event(f"c{i}", "u1", 1.7e9 + i, "click", category=f"{i:03d}" + "c" * 297, item_id="i")
              for i in range(60)]
    whole = apply(ProfileState("u1"), events, params)  # does not raise: the profile could hold this delta
    assert delta_budget(LIMIT) < json_size(whole.delta) < LIMIT // 2

    table: dict[str, dict[str, Any]] = {}
    deltas = fold_in_rounds(events, params, table)
    assert [d["version"] for d in deltas] == list(range(1, len(deltas) + 1)) and len(deltas) >= 2
    assert max(json_size(d) for d in deltas) <= delta_budget(LIMIT)
    assert [eid for d in deltas for eid in d["event_ids"]] == [e.event_id for e in events]


def test_a_batch_whose_size_estimate_is_over_the_budget_but_whose_delta_fits_stays_one_version() -> None:
    # The estimate allows each key's value and a dropped key as long as the longest beside it; measured, it fits
    # (and the state, over the budget itself, does not settle it: the delta is measured on its own).
    params = ProfileParams(half_life_s=86400.0, weights=WEIGHTS, top_k=50, max_record_bytes=LIMIT)
    events = [Event(f"c{i}", "u1", 1.7e9 + i, "click", category=f"{i:02d}" + "c" * 198, item_id="i")
              for i in range(50)]
    assert len(split_rounds(events, {}.get, LIMIT)) > 1  # the estimate alone would cut it
    deltas = fold_in_rounds(events, params, {})
    assert len(deltas) == 1 and json_size(deltas[0]) <= delta_budget(LIMIT)


def test_the_budget_leaves_room_for_a_pseudonym_in_place_of_the_user_id() -> None:
    # A batch whose delta, under the one-letter user id, is 10 bytes under the budget: sent under a 64-character
    # pseudonym it would not be, so it must be cut.
    params = ProfileParams(half_life_s=86400.0, weights=WEIGHTS, top_k=500, max_record_bytes=LIMIT)
    events = [Event(f"c{i}", "u", 1.7e9 + i, "click", category=f"{i:03d}" + "c" * 297, item_id="i")
              for i in range(48)]
    pad = delta_budget(LIMIT) - 10 - json_size(apply(ProfileState("u"), events, params).delta)
    events[-1] = dataclasses.replace(events[-1], category=events[-1].category + "c" * pad)
    assert json_size(apply(ProfileState("u"), events, params).delta) == delta_budget(LIMIT) - 10

    deltas = fold_in_rounds(events, params, {})
    assert len(deltas) > 1
    for delta in deltas:
        assert json_size({**delta, "user_id": "f" * 64}) <= delta_budget(LIMIT)


def test_a_user_whose_profile_cannot_fit_even_in_pieces_is_reported_not_retried_forever() -> None:
    params = ProfileParams(half_life_s=86400.0, weights=WEIGHTS, top_k=500, max_record_bytes=LIMIT)
    stored = {"big": ProfileState("big", half_life_s=86400.0, landmark=1.7e9, version=1,
                                  keywords={f"{'k' * 1000}{i}": 1.0 for i in range(100)}).to_dict()}
    events = [Event("e1", "big", 1.7e9, "search", query="hello"),
              Event("e2", "small", 1.7e9, "click", category="shoes", item_id="i")]
    rounds = list(fold.fold_in_rounds(events, stored.get, params))
    assert len(rounds) == 1
    assert [(f.user_id, [e.event_id for e in f.events]) for f in rounds[0].failures] == [("big", ["e1"])]
    assert "ProfileTooLarge" in rounds[0].failures[0].reason
    assert list(rounds[0].writes) == ["small"] and rounds[0].events == 2


def test_a_profile_that_cannot_fit_raises_instead_of_writing_an_oversized_record() -> None:
    state = ProfileState("u", keywords={f"{'k' * 1000}{i}": 1.0 for i in range(100)})
    with pytest.raises(ProfileTooLarge, match="PROFILE_MAX_RECORD_BYTES=65536"):
        bound_record(state, LIMIT)


def record_size(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> int:
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers))


def test_bundles_are_packed_under_the_limit_in_order() -> None:
    events = [Event(f"r{i}", "u1", float(i), "review", item_id="i", rating=5, sentiment=0.5,
                    embedding=(0.123456789,) * 384) for i in range(300)]
    values = list(pack_bundles(events, LIMIT - 128))
    assert len(values) > 1
    assert all(record_size(None, value, []) <= LIMIT for value in values)
    assert [event_from_trusted_doc(doc) for value in values for doc in orjson.loads(value)] == events


def test_a_dead_letter_over_the_limit_keeps_a_prefix_and_its_original_size() -> None:
    headers = [("dlq.kind", b"too_large"), ("dlq.reason", b"message is 3000000 bytes")]
    small_key, small_value, small_headers = bounded_dead_letter(b"u1", b"{broken", headers, LIMIT)
    assert (small_key, small_value, small_headers) == (b"u1", b"{broken", headers)

    value = bytes(range(256)) * 12_000
    key, cut, sent_headers = bounded_dead_letter(b"u1", value, headers, LIMIT)
    assert key == b"u1" and value.startswith(cut) and len(cut) > LIMIT // 2
    assert dict(sent_headers)["dlq.original_size"] == str(len(value)).encode()
    assert record_size(key, cut, sent_headers) <= LIMIT

    key, cut, sent_headers = bounded_dead_letter(b"k" * 2 * LIMIT, value, headers, LIMIT)
    assert dict(sent_headers)["dlq.original_key_size"] == str(2 * LIMIT).encode()
    assert record_size(key, cut, sent_headers) <= LIMIT


_TEXT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(st.tuples(_TEXT, st.one_of(st.none(), _TEXT), st.one_of(st.none(), _TEXT),
                              st.one_of(st.none(), st.integers(1, 400))), min_size=1, max_size=12),
    stored=st.dictionaries(st.sampled_from(["interests", "keywords"]), st.dictionaries(_TEXT, st.just(1.0),
                                                                                         max_size=5)),
    budget=st.integers(1_500, 12_000),
)
def test_the_quick_bound_never_changes_how_a_users_events_are_cut(
        events: list[tuple[str, str | None, str | None, int | None]], stored: dict[str, Any], budget: int) -> None:
    # Budgets near one event's estimate (~1.1-12 KB), so that both the quick path and the exact cut are taken.
    batch = [Event(f"e{i}-{eid}", "u1", 1.7e9 + i, "search" if query else "click", category=category,
                   query=query, embedding=[0.5] * dims if dims else None)
             for i, (eid, category, query, dims) in enumerate(events)]
    user_bytes = max(json_size("u1"), limits.PSEUDONYM_BYTES)
    assert limits.user_chunks("u1", batch, stored, budget) == limits._exact_chunks(user_bytes, batch, stored, budget)


def test_the_quick_bound_is_at_least_the_exact_estimate_for_escaped_and_wide_text() -> None:
    # Control characters become 6-byte escapes, CJK and emoji 3-4 UTF-8 bytes: the bound covers both.
    events = [Event("e\x01\x02", "u1", 1.7e9, "click", category="\x1f" * 30),
              Event("e2", "u1", 1.7e9, "search", query="😀😀 漢字漢字 \x07\x07 plain")]
    stored = {"keywords": {"\x00" * 20: 1.0}, "interests": {"ü" * 10: 1.0}}
    estimate = limits._DeltaEstimate(max(json_size("u1"), limits.PSEUDONYM_BYTES), {
        name: max((json_size(k) for k in stored[name]), default=0) for name in ("interests", "keywords")})
    for event in events:
        size, new_keys, max_key = estimate.size_with(event)
        estimate.add(event, new_keys, max_key)
    assert limits._loose_size(max(json_size("u1"), limits.PSEUDONYM_BYTES), events, stored) >= size
