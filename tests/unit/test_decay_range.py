"""Decay over the whole accepted event-time range (1970..2200), any order and batching, any read time in range.

Realistic spans are covered by test_profile_math.py and test_subscriber.py; here every timestamp pair the
contract accepts may meet in one profile, with half-lives from a minute to a year.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.events import MAX_TS, MIN_TS, Event
from stream_app.core.decay import RESCALE_AFTER_HALF_LIVES, UNDERFLOW_HALF_LIVES, check_read_time
from stream_app.core.fold import fold_batch
from stream_app.core.profile import Delta, ProfileParams, ProfileState, apply
from stream_app.core.replica import ProfileReplicas
from tests.oracle import expected_view

WEEK = 7 * 86400.0
WEIGHTS = {"click": 1.0, "search": 2.0, "review": 3.0}
# Weights below 2^-900 of the newest event's are not compared with the oracle: the engine may count
# them as exactly 0 (more than 1000 half-lives before the landmark, docs/semantics.md "Bounds").
NEGLIGIBLE = 2.0 ** -900

full_range = st.floats(MIN_TS, MAX_TS, exclude_max=True, allow_nan=False)
# Full-range times, with clusters so that near and far events meet in the same profile.
times = st.one_of(full_range, st.sampled_from([0.0, 1.7e9, MAX_TS - 1]), st.floats(1.7e9, 1.7e9 + 40 * WEEK))
half_lives = st.sampled_from([60.0, 3600.0, WEEK, 365 * 86400.0])


@st.composite
def events(draw: st.DrawFn, users: tuple[str, ...] = ("u1", "u2")) -> Event:
    eid = f"e{draw(st.integers(0, 40))}"  # small id space: duplicates happen
    user = draw(st.sampled_from(users))
    ts = draw(times)
    kind = draw(st.sampled_from(["click", "search", "review"]))
    category = draw(st.one_of(st.none(), st.sampled_from(["a", "b", "c"])))
    if kind == "click":
        return Event(eid + user, user, ts, "click", category=category, item_id="i")
    if kind == "search":
        return Event(eid + user, user, ts, "search", category=category, query=draw(st.sampled_from(["red shoes",
                                                                                                     "blue hat"])))
    return Event(eid + user, user, ts, "review", category=category, item_id="i",
                 rating=draw(st.one_of(st.none(), st.integers(1, 5))), sentiment=draw(st.floats(-1, 1)),
                 embedding=tuple(draw(st.lists(st.floats(-1, 1), min_size=3, max_size=3))))


def floats_in(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [x for v in value.values() for x in floats_in(v)]
    if isinstance(value, list | tuple):
        return [x for v in value for x in floats_in(v)]
    return []


def assert_finite(value: Any) -> None:
    bad = [x for x in floats_in(value) if not math.isfinite(x)]
    assert not bad, bad
    # orjson writes NaN/inf as null; a null where a number belongs would be the same bug, hidden.
    assert floats_in(orjson.loads(orjson.dumps(value))) == floats_in(value)


def close(actual: float, expected: float) -> bool:
    return abs(actual - expected) <= 1e-9 * abs(expected) + NEGLIGIBLE


def assert_matches_oracle(view: dict[str, Any], user_events: list[Event], params: ProfileParams,
                          at: float | None) -> None:
    """The oracle's values where they are representable: weights under NEGLIGIBLE may be 0 in the engine.

    A read time before as_of reads at as_of (the documented rule), so the oracle is asked for that. Means
    do not depend on the read time (the decay cancels in the ratio): they are compared at as_of, where the
    oracle's own weights underflow least."""
    unique = list({e.event_id: e for e in reversed(user_events)}.values())  # the first occurrence counts
    as_of = max(e.ts for e in unique)
    read_at = as_of if at is None else max(at, as_of)
    expected = expected_view(view["user_id"], user_events, params, read_at)
    assert view["as_of"] == expected["as_of"] == as_of
    for name in ("activity", "interests", "keywords"):
        # Pruning never happens here (top_k is large), so the keys are exactly the oracle's.
        assert set(view[name]) == set(expected[name]), name
        for key, value in expected[name].items():
            assert close(view[name][key], value), (name, key, view[name][key], value)
    at_as_of = expected_view(view["user_id"], user_events, params, as_of)
    for name, has in (("rating", lambda e: e.rating is not None), ("sentiment", lambda e: e.sentiment is not None),
                      ("embedding", lambda e: e.embedding is not None)):
        weights = [2.0 ** (-(as_of - e.ts) / params.half_life_s) for e in unique if has(e)]
        if not weights:
            assert view[name] is None, name
        elif max(weights) >= NEGLIGIBLE:
            got, want = view[name], at_as_of[name]
            if name == "embedding":
                assert all(abs(g - w) <= 1e-9 for g, w in zip(got, want, strict=True)), (got, want)
            else:
                assert abs(got - want) <= 1e-9 * abs(want) + 1e-12, (name, got, want)


def fold_all(batches: list[list[Event]], params: ProfileParams) -> tuple[dict[str, dict[str, Any]], list[Delta]]:
    table: dict[str, dict[str, Any]] = {}
    published: list[Delta] = []
    for batch in batches:
        folded = fold_batch(batch, table.get, params)
        assert folded.failures == []
        table.update(folded.writes)
        published.extend(copy.deepcopy(delta) for delta, _ in folded.deltas)
    return table, published


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.lists(events(), min_size=1, max_size=10), min_size=1, max_size=8),
       half_life=half_lives, read_times=st.lists(full_range, max_size=3))
def test_any_events_in_range_any_batching_give_finite_state_oracle_views_and_exact_replicas(
    batches: list[list[Event]], half_life: float, read_times: list[float]
) -> None:
    params = ProfileParams(half_life_s=half_life, weights=WEIGHTS, top_k=50, dedup_window=512)
    table, published = fold_all(batches, params)
    for value in table.values():
        assert_finite(value)
        state = ProfileState.from_dict(value)
        assert state.landmark is not None and state.as_of is not None and state.half_life_s is not None
        assert 0 <= (state.as_of - state.landmark) / half_life <= RESCALE_AFTER_HALF_LIVES
    for delta in published:
        assert_finite(delta)
    replicas = ProfileReplicas().apply_all(published)
    assert replicas.gaps == []
    every = [e for batch in batches for e in batch]
    for user, value in table.items():
        state = ProfileState.from_dict(value)
        user_events = [e for e in every if e.user_id == user]
        for at in (None, *read_times):
            view = state.view(at)
            assert_finite(view)
            assert replicas.profiles[user].view(at) == view  # the replica is bit-identical to the table
            assert_matches_oracle(view, user_events, params, at)


@settings(max_examples=200, deadline=None)
@given(st.lists(events(users=("u1",)), min_size=1, max_size=30, unique_by=lambda e: e.event_id),
       st.randoms(use_true_random=False), half_lives)
def test_the_same_events_in_another_order_and_batching_give_the_same_profile(
    evs: list[Event], rng: Any, half_life: float
) -> None:
    params = ProfileParams(half_life_s=half_life, weights=WEIGHTS)
    one_batch = ProfileState("u1")
    apply(one_batch, evs, params)
    shuffled = evs[:]
    rng.shuffle(shuffled)
    batched = ProfileState("u1")
    while shuffled:
        size = rng.randint(1, 5)
        apply(batched, shuffled[:size], params)
        shuffled = shuffled[size:]
    for state in (one_batch, batched):
        assert_finite(state.to_dict())
        assert_matches_oracle(state.view(), evs, params, None)


def test_two_clicks_1970_and_2023_in_one_batch_no_longer_crash_the_fold() -> None:
    """Issue 12, case 1: a new user's landmark was the batch's oldest event; 2^((t - L)/H) overflowed."""
    params = ProfileParams(half_life_s=WEEK, weights=WEIGHTS)
    batch = [Event("old", "u1", 0.0, "click", category="a", item_id="i"),
             Event("new", "u1", 1.7e9, "click", category="b", item_id="i")]
    folded = fold_batch(batch, {}.get, params)
    assert folded.failures == []
    [(delta, _)] = folded.deltas
    assert delta["landmark"] == 1.7e9 and delta["activity"] == {"click": 1.0}
    # 1970 is ~2,800 weeks before 2023: its weight, 2^-2810, is below 2^-1000 and counts as exactly 0.
    assert delta["interests"] == {"a": 0.0, "b": 1.0}
    view = ProfileState.from_dict(folded.writes["u1"]).view()
    assert view["activity"] == {"click": 1.0} and view["interests"] == {"b": 1.0, "a": 0.0}


@pytest.mark.parametrize("half_lives_apart", [63.0, 64.5, 1021.5, 1023.0, 1024.0, 1030.0, 1100.0])
def test_a_first_batch_spanning_up_to_and_past_1024_half_lives_stores_finite_values(half_lives_apart: float) -> None:
    """~1022-1024 half-lives used to store inf (2^1023 + 2^1023), and more raised OverflowError."""
    params = ProfileParams(half_life_s=3600.0, weights=WEIGHTS)
    newest = 1.7e9
    old = newest - half_lives_apart * 3600.0
    state = ProfileState("u1")
    delta = apply(state, [Event(f"o{i}", "u1", old, "click", item_id="i") for i in range(3)]
                  + [Event("n", "u1", newest, "click", item_id="i")], params).delta
    assert delta is not None
    assert_finite(delta)
    assert_finite(state.to_dict())
    want = 1.0 + 3 * 2.0 ** -half_lives_apart if half_lives_apart <= UNDERFLOW_HALF_LIVES else 1.0
    assert state.view()["activity"]["click"] == pytest.approx(want, rel=1e-12)


def test_events_in_2199_and_1970_then_more_in_between_never_overflow() -> None:
    """Landmark moves far forward, late events far back, in separate batches: every value stays finite."""
    params = ProfileParams(half_life_s=60.0, weights=WEIGHTS)
    state = ProfileState("u1")
    replica = ProfileReplicas()
    for i, ts in enumerate([1.0, MAX_TS - 1, 0.0, 3.6e9, MAX_TS - 61, 1.7e9]):
        result = apply(state, [Event(f"e{i}", "u1", ts, "review", item_id="i", rating=5, sentiment=0.5,
                                     embedding=(0.6, 0.8))], params)
        assert result.delta is not None
        assert_finite(result.delta)
        replica.apply(copy.deepcopy(result.delta))
    assert state.landmark == MAX_TS - 1
    view = state.view()
    # Only the two 2199 events count: the one 60 s earlier weighs 1/2.
    assert view["activity"] == {"review": pytest.approx(1.5, rel=1e-12)}
    assert view["rating"] == 5.0 and view["sentiment"] == 0.5
    assert replica.profiles["u1"].view() == view


def test_a_read_time_before_as_of_reads_at_as_of_and_bad_read_times_are_refused() -> None:
    params = ProfileParams(half_life_s=3600.0, weights=WEIGHTS)
    state = ProfileState("u1")
    apply(state, [Event("a", "u1", 1.7e9, "click", item_id="i"), Event("b", "u1", 1.7e9 - 3600, "click", item_id="i")],
          params)
    at_as_of = state.view()
    assert at_as_of["activity"] == {"click": 1.5}
    # A profile can be aged forward, not back: years before it, or one second before, it reads at as_of.
    assert state.view(0.0) == at_as_of and state.view(1.7e9 - 1) == at_as_of
    assert state.view(1.7e9 + 3600)["activity"] == {"click": 0.75}
    assert state.view(MAX_TS - 1)["activity"] == {"click": 0.0}  # ~150,000 half-lives later: exactly 0
    for bad in (math.nan, math.inf, -math.inf, -1.0, MAX_TS, 1e300):
        with pytest.raises(ValueError, match="read time"):
            state.view(bad)
        with pytest.raises(ValueError, match="read time"):
            check_read_time(bad)
    assert check_read_time(MIN_TS) == MIN_TS and check_read_time(MAX_TS - 1) == MAX_TS - 1
