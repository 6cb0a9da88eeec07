"""fold_batch: one user's failing fold is reported and changes nothing; a profile built under other settings
stops the fold instead of being dead-lettered."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from schemas.events import Event
from stream_app.core.fold import fold_batch
from stream_app.core.profile import IncompatibleProfile, ProfileParams, ProfileState, apply

PARAMS = ProfileParams(half_life_s=3600.0, weights={"click": 1.0, "search": 2.0, "review": 3.0})


def review(eid: str, user: str, embedding: tuple[Any, ...], ts: float = 1.7e9) -> Event:
    return Event(eid, user, ts, "review", item_id="i", rating=4, sentiment=0.5, embedding=embedding)


def stored_profile(user: str) -> dict[str, Any]:
    state = ProfileState(user)
    apply(state, [review(f"{user}-0", user, (0.6, 0.8), ts=1.7e9 - 60),
                  Event(f"{user}-1", user, 1.7e9 - 30, "search", category="c", query="red shoes")], PARAMS)
    return state.to_dict()


def test_a_failing_user_is_reported_unchanged_and_the_others_are_folded() -> None:
    table = {"bad": stored_profile("bad"), "good": stored_profile("good")}
    before = copy.deepcopy(table)
    # The first event of "bad" is fine, the second fails half-way through apply (after the sums of the first
    # were added in place): the stored value must not show any of it.
    batch = [review("b1", "bad", (0.0, 1.0)), review("g1", "good", (1.0, 0.0)),
             review("b2", "bad", (None, None))]  # type: ignore[arg-type]  # damaged on the internal topic
    folded = fold_batch(batch, table.get, PARAMS)
    [failure] = folded.failures
    assert failure.user_id == "bad" and [e.event_id for e in failure.events] == ["b1", "b2"]
    assert failure.reason.startswith("profile update failed: TypeError: unsupported operand type(s)")
    assert table["bad"] == before["bad"]  # the table's in-memory value was not touched
    assert set(folded.writes) == {"good"} and [d["user_id"] for d, _ in folded.deltas] == ["good"]
    assert folded.writes["good"]["version"] == 2


def test_a_profile_with_another_half_life_or_embedding_size_raises_and_is_not_isolated() -> None:
    table = {"u1": stored_profile("u1"), "u2": stored_profile("u2")}
    with pytest.raises(IncompatibleProfile, match=r"profile 'u1' holds 2-dimensional embeddings, the encoder now "
                                                  r"gives 3; replay into a new app id to change the encoder"):
        fold_batch([review("x", "u1", (0.6, 0.0, 0.8))], table.get, PARAMS)
    other = ProfileParams(half_life_s=7200.0, weights=PARAMS.weights)
    with pytest.raises(IncompatibleProfile, match=r"built with half-life 3600.0 s, settings say 7200.0 s"):
        fold_batch([Event("y", "u2", 1.7e9, "click", item_id="i")], table.get, other)
    assert table == {"u1": stored_profile("u1"), "u2": stored_profile("u2")}
