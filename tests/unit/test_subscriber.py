"""Rebuilding profiles from deltas gives exactly the worker's table profiles."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import MAX_TS, MIN_TS, Event
from stream_app.core.fold import fold_batch
from stream_app.core.profile import Delta, ProfileParams, ProfileState, apply
from stream_app.core.replica import ProfileReplicas, apply_delta

HOUR = 3600.0

users = st.sampled_from(["u1", "u2", "u3"])
categories = st.one_of(st.none(), st.sampled_from(["a", "b", "c", "d", "e"]))
queries = st.sampled_from(["red shoes", "blue bag", "summer hat", "red hat", "the shoes"])
# Wide time spans force landmark moves (rescaling) on the way; the whole accepted range (1970..2200) makes
# first batches span far more than 1024 half-lives and late events underflow to exactly 0.
times = st.one_of(st.floats(min_value=0.0, max_value=400 * HOUR, allow_nan=False),
                  st.floats(min_value=MIN_TS, max_value=MAX_TS, exclude_max=True))


@st.composite
def events(draw: st.DrawFn) -> Event:
    eid = f"e{draw(st.integers(0, 60))}"  # small id space: duplicates happen
    user = draw(users)
    ts = draw(times)
    kind = draw(st.sampled_from(["click", "search", "review"]))
    category = draw(categories)
    if kind == "click":
        return Event(eid + user, user, ts, "click", category=category, item_id="i")
    if kind == "search":
        return Event(eid + user, user, ts, "search", category=category, query=draw(queries))
    return Event(eid + user, user, ts, "review", category=category, item_id="i", text="t",
                 rating=draw(st.one_of(st.none(), st.integers(1, 5))),
                 sentiment=draw(st.floats(-1, 1)),
                 embedding=tuple(draw(st.lists(st.floats(-1, 1), min_size=3, max_size=3))))


def run_worker_logic(batches: list[list[Event]], params: ProfileParams) -> tuple[dict[str, ProfileState], list[Delta]]:
    """The profile agent's own fold, batch by batch, over a dict standing in for the table."""
    table: dict[str, dict[str, Any]] = {}
    published: list[Delta] = []
    for batch in batches:
        folded = fold_batch(batch, table.get, params)
        table.update(folded.writes)
        published.extend(copy.deepcopy(delta) for delta, _ in folded.deltas)
    return {user: ProfileState.from_dict(value) for user, value in table.items()}, published


@settings(max_examples=150, deadline=None)
@given(batches=st.lists(st.lists(events(), min_size=1, max_size=12), min_size=1, max_size=15),
       top_k=st.integers(1, 6), half_life_h=st.sampled_from([0.5, 1.0, 24.0]))
def test_rebuild_from_deltas_equals_table(batches: list[list[Event]], top_k: int, half_life_h: float) -> None:
    params = ProfileParams(half_life_s=half_life_h * HOUR, weights={"click": 1.0, "search": 2.0, "review": 3.0},
                           top_k=top_k)
    table, published = run_worker_logic(batches, params)
    replicas = ProfileReplicas().apply_all(published)
    assert replicas.gaps == []
    assert set(replicas.profiles) == set(table)
    for user, state in table.items():
        rebuilt = replicas.profiles[user]
        assert state.as_of is not None
        for at in (None, min(state.as_of + 5 * HOUR, MAX_TS - 1), MIN_TS):
            assert rebuilt.view(at) == state.view(at)  # bit-identical, well within 1e-9


def test_redelivered_and_duplicate_deltas_are_skipped() -> None:
    params = ProfileParams(half_life_s=HOUR, weights={"click": 1.0, "search": 1.0, "review": 1.0})
    state = ProfileState("u1")
    d1 = apply(state, [Event("a", "u1", 0.0, "click", item_id="i")], params).delta
    d2 = apply(state, [Event("b", "u1", 10.0, "click", item_id="i")], params).delta
    assert d1 is not None and d2 is not None
    replicas = ProfileReplicas().apply_all([d1, d2, d1, d2])
    assert replicas.duplicates == 2
    assert replicas.profiles["u1"].view() == state.view()


def test_gap_is_recorded_and_later_fields_still_apply() -> None:
    params = ProfileParams(half_life_s=HOUR, weights={"click": 1.0, "search": 1.0, "review": 1.0})
    state = ProfileState("u1")
    deltas = [apply(state, [Event(f"e{i}", "u1", float(i), "click", item_id="i")], params).delta for i in range(3)]
    replicas = ProfileReplicas()
    replicas.apply(deltas[0])  # type: ignore[arg-type]
    replicas.apply(deltas[2])  # type: ignore[arg-type]
    assert replicas.gaps == [("u1", 2, 3)]
    # Deltas carry absolute stored values, so a key touched after the gap is right again.
    assert replicas.profiles["u1"].view()["activity"] == state.view()["activity"]


def test_apply_delta_rescales_untouched_fields_when_landmark_moves() -> None:
    params = ProfileParams(half_life_s=HOUR, weights={"click": 1.0, "search": 1.0, "review": 1.0})
    state = ProfileState("u1")
    replica = ProfileState("u1")
    for event in (Event("a", "u1", 0.0, "click", category="old", item_id="i"),
                  Event("b", "u1", 500 * HOUR, "search", query="new")):
        delta = apply(state, [event], params).delta
        assert delta is not None
        apply_delta(replica, delta)
    assert "interests" not in delta and replica.landmark == 500 * HOUR
    assert replica.view() == state.view()
