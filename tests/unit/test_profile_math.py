"""Decay math of the pure profile update, against hand-computed values and the brute-force oracle."""

from __future__ import annotations

import random

import pytest

from schemas.events import Event
from stream_app.core.decay import RESCALE_AFTER_HALF_LIVES
from stream_app.core.profile import ProfileParams, ProfileState, apply, apply_one
from tests.oracle import assert_close_maps, assert_view_matches, expected_view

HOUR = 3600.0
PARAMS = ProfileParams(half_life_s=HOUR, weights={"click": 1.0, "search": 2.0, "review": 3.0}, top_k=50)


def click(eid: str, ts: float, category: str | None = None, user: str = "u1") -> Event:
    return Event(eid, user, ts, "click", category=category, item_id="i")


def test_two_clicks_one_half_life_apart_give_one_and_a_half() -> None:
    profile = ProfileState("u1")
    apply_one(profile, click("e1", 1000.0), PARAMS)
    apply_one(profile, click("e2", 1000.0 + HOUR), PARAMS)
    assert profile.view()["activity"]["click"] == pytest.approx(1.5, rel=1e-12)
    # Read one more half-life later, everything halves.
    assert profile.view(at=1000.0 + 2 * HOUR)["activity"]["click"] == pytest.approx(0.75, rel=1e-12)


def test_weights_apply_to_interests_not_activity() -> None:
    profile = ProfileState("u1")
    apply_one(profile, Event("s1", "u1", 0.0, "search", category="shoes", query="red shoes"), PARAMS)
    apply_one(profile, Event("r1", "u1", HOUR, "review", category="shoes", item_id="i", text="ok", rating=4), PARAMS)
    view = profile.view()
    assert view["activity"] == pytest.approx({"search": 0.5, "review": 1.0})
    assert view["interests"]["shoes"] == pytest.approx(2.0 * 0.5 + 3.0 * 1.0)
    assert view["keywords"] == pytest.approx({"red": 0.5, "shoes": 0.5})
    assert view["rating"] == pytest.approx(4.0)


def test_rating_is_a_decayed_mean() -> None:
    profile = ProfileState("u1")
    for eid, ts, rating in (("a", 0.0, 1), ("b", HOUR, 5)):
        apply_one(profile, Event(eid, "u1", ts, "review", item_id="i", text="t", rating=rating), PARAMS)
    # weights 0.5 and 1 at as_of: (0.5*1 + 1*5) / 1.5
    assert profile.view()["rating"] == pytest.approx(5.5 / 1.5, rel=1e-12)
    assert profile.view(at=100 * HOUR)["rating"] == pytest.approx(5.5 / 1.5, rel=1e-12)


def test_late_event_is_folded_in_exactly() -> None:
    profile = ProfileState("u1")
    apply_one(profile, click("new", 10 * HOUR, "a"), PARAMS)
    delta = apply_one(profile, click("late", 7 * HOUR, "a"), PARAMS)
    assert delta is not None and delta["as_of"] == 10 * HOUR  # as_of stays the newest event time
    assert profile.view()["activity"]["click"] == pytest.approx(1.0 + 0.125, rel=1e-12)


def _random_events(rng: random.Random, n: int, span_s: float) -> list[Event]:
    events = []
    for i in range(n):
        kind = rng.choice(["click", "search", "review"])
        ts = rng.uniform(0, span_s)
        category = rng.choice([None, "shoes", "bags", "hats"])
        if kind == "click":
            events.append(Event(f"e{i}", "u1", ts, "click", category=category, item_id="x"))
        elif kind == "search":
            events.append(Event(f"e{i}", "u1", ts, "search", category=category,
                                query=rng.choice(["red shoes", "the blue bag", "hat for summer", "red hat"])))
        else:
            events.append(Event(f"e{i}", "u1", ts, "review", category=category, item_id="x", text="t",
                                rating=rng.choice([None, 1, 2, 3, 4, 5]), sentiment=rng.uniform(-1, 1)))
    return events


def test_order_independence_shuffled_and_batched_differently() -> None:
    rng = random.Random(7)
    events = _random_events(rng, 300, span_s=30 * HOUR)
    in_order = ProfileState("u1")
    apply(in_order, sorted(events, key=lambda e: e.ts), PARAMS)
    shuffled = ProfileState("u1")
    rest = events[:]
    rng.shuffle(rest)
    while rest:  # random micro-batch sizes
        size = rng.randint(1, 20)
        apply(shuffled, rest[:size], PARAMS)
        rest = rest[size:]
    assert_view_matches(shuffled.view(), in_order.view())
    assert_view_matches(in_order.view(), expected_view("u1", events, PARAMS))


def test_rescaling_keeps_values_exact_over_long_spans() -> None:
    # Ten years of hourly-half-life decay is ~87,600 half-lives: without moving the landmark the stored
    # values would overflow a float (2^1024) after ~1,000 half-lives.
    rng = random.Random(3)
    span = 10 * 365 * 24 * HOUR
    times = sorted(rng.uniform(0, span) for _ in range(2000)) + [span - 0.5 * HOUR, span]
    profile = ProfileState("u1")
    landmarks = set()
    for i, ts in enumerate(times):
        apply_one(profile, click(f"e{i}", ts, "c"), PARAMS)
        landmarks.add(profile.landmark)
    assert len(landmarks) > 100  # it really did rescale, many times
    assert profile.landmark is not None
    assert (span - profile.landmark) / HOUR <= RESCALE_AFTER_HALF_LIVES
    expected = sum(2.0 ** (-(span - t) / HOUR) for t in times)
    assert profile.view()["activity"]["click"] == pytest.approx(expected, rel=1e-12)
    assert profile.view()["interests"]["c"] == pytest.approx(expected, rel=1e-12)


def test_late_event_far_before_landmark_does_not_break_rescaled_profile() -> None:
    profile = ProfileState("u1")
    apply_one(profile, click("a", 0.0), PARAMS)
    apply_one(profile, click("b", 1000 * HOUR), PARAMS)  # rescales
    apply_one(profile, click("c", 999 * HOUR), PARAMS)  # late, before the new landmark
    assert profile.view()["activity"]["click"] == pytest.approx(1.5, rel=1e-12)


def test_duplicates_count_once_and_redeliver_their_delta() -> None:
    profile = ProfileState("u1")
    first = apply(profile, [click("e1", 0.0, "a"), click("e1", 0.0, "a")], PARAMS)
    assert first.delta is not None and first.delta["event_ids"] == ["e1"]
    again = apply(profile, [click("e1", 0.0, "a")], PARAMS)
    assert again.delta is None
    assert again.redeliveries == [first.delta]  # re-emitted in case the first send was lost
    assert profile.version == 1
    assert profile.view()["activity"]["click"] == 1.0


def test_dedup_window_is_bounded() -> None:
    params = ProfileParams(half_life_s=HOUR, weights=PARAMS.weights, dedup_window=3, redelivery_window=2)
    profile = ProfileState("u1")
    for i in range(10):
        apply_one(profile, click(f"e{i}", float(i)), params)
    assert list(profile.seen) == ["e7", "e8", "e9"]
    assert [d["version"] for d in profile.outbox] == [9, 10]
    # Beyond the window a redelivered event is, documentedly, counted again.
    assert apply_one(profile, click("e0", 0.0), params) is not None


def test_top_k_prunes_smallest_and_reports_dropped_keys() -> None:
    params = ProfileParams(half_life_s=HOUR, weights=PARAMS.weights, top_k=2)
    profile = ProfileState("u1")
    apply_one(profile, click("a", 0.0, "old"), params)
    apply_one(profile, click("b", HOUR, "mid"), params)
    delta = apply_one(profile, click("c", 2 * HOUR, "new"), params)
    assert delta is not None
    assert delta["dropped"] == {"interests": ["old"]}
    assert list(profile.view()["interests"]) == ["new", "mid"]


def test_delta_carries_only_changed_keys_and_aging_information() -> None:
    profile = ProfileState("u1")
    apply_one(profile, click("a", 0.0, "shoes"), PARAMS)
    delta = apply_one(profile, Event("s", "u1", HOUR, "search", query="Red shoes!"), PARAMS)
    assert delta is not None
    assert set(delta) == {"user_id", "version", "event_ids", "as_of", "landmark", "half_life_s", "activity", "keywords"}
    assert delta["activity"] == {"search": 2.0}  # stored value relative to landmark 0: 2^(1h/1h)
    assert_close_maps(delta["keywords"], {"red": 2.0, "shoes": 2.0})
    assert delta["version"] == 2 and delta["landmark"] == 0.0 and delta["half_life_s"] == HOUR


def test_changing_half_life_on_an_existing_profile_is_refused() -> None:
    profile = ProfileState("u1")
    apply_one(profile, click("a", 0.0), PARAMS)
    other = ProfileParams(half_life_s=2 * HOUR, weights=PARAMS.weights)
    with pytest.raises(ValueError, match="half-life"):
        apply_one(profile, click("b", 1.0), other)


def test_state_round_trips_through_json() -> None:
    import orjson

    profile = ProfileState("u1")
    apply(profile, _random_events(random.Random(1), 50, 5 * HOUR), PARAMS)
    restored = ProfileState.from_dict(orjson.loads(orjson.dumps(profile.to_dict())))
    assert restored == profile
