"""After a crash only a user's newest delta can be unsent; a recovered state sends it again before anything newer
(`stream_app.core.fold.unsent_after_recovery`), so the outbox needs no older deltas."""

from __future__ import annotations

from typing import Any

from schemas.events import Event
from stream_app.core.fold import fold_batch, fold_in_rounds
from stream_app.core.profile import ProfileParams, ProfileState
from stream_app.ops.settings import Settings

PARAMS = ProfileParams(half_life_s=3600.0, weights={"click": 1.0, "search": 2.0, "review": 3.0})


def click(event_id: str, user: str = "u1", ts: float = 1.7e9) -> Event:
    return Event(event_id, user, ts, "click", item_id="i", category="shoes")


def folded_twice() -> dict[str, dict[str, Any]]:
    """u1 at version 2, as the changelog holds it after two folds."""
    table: dict[str, dict[str, Any]] = {}
    for n in (1, 2):
        table.update(fold_batch([click(f"e{n}", ts=1.7e9 + n)], table.get, PARAMS).writes)
    return table


def versions(deltas: list[tuple[dict[str, Any], bool]]) -> list[tuple[int, bool]]:
    return [(delta["version"], again) for delta, again in deltas]


def test_the_default_outbox_keeps_only_the_newest_delta() -> None:
    assert Settings().redelivery_window == 1 == PARAMS.redelivery_window
    outbox = folded_twice()["u1"]["outbox"]
    assert [delta["version"] for delta in outbox] == [2]


def test_a_fresh_event_first_after_recovery_sends_the_recovered_newest_delta_before_its_own() -> None:
    # The crash-prone order: a fresh event from one input stream folds before the redelivered events of the
    # other come back. Without the re-send, version 2 would never reach subscribers if it was lost.
    table = folded_twice()
    folded = fold_batch([click("e3", ts=1.7e9 + 3)], table.get, PARAMS, unsettled={"u1"})
    assert versions(folded.deltas) == [(2, True), (3, False)]
    assert folded.deltas[0][0] == table["u1"]["outbox"][-1]  # exactly what was (or was not) sent
    assert folded.users == ["u1"]


def test_a_redelivered_event_of_the_newest_version_is_re_emitted_once() -> None:
    table = folded_twice()
    folded = fold_batch([click("e2", ts=1.7e9 + 2)], table.get, PARAMS, unsettled={"u1"})
    assert versions(folded.deltas) == [(2, True)] and folded.writes == {}


def test_a_redelivered_event_of_an_older_version_re_emits_only_the_possibly_unsent_newest() -> None:
    # Version 1's delta was confirmed before version 2 was written: nothing to re-emit for it.
    table = folded_twice()
    assert versions(fold_batch([click("e1", ts=1.7e9 + 1)], table.get, PARAMS).deltas) == []
    folded = fold_batch([click("e1", ts=1.7e9 + 1)], table.get, PARAMS, unsettled={"u1"})
    assert versions(folded.deltas) == [(2, True)]


def test_a_settled_user_sends_only_the_new_delta() -> None:
    table = folded_twice()
    folded = fold_batch([click("e3", ts=1.7e9 + 3)], table.get, PARAMS, unsettled={"someone else"})
    assert versions(folded.deltas) == [(3, False)]


def test_a_recovered_user_without_deltas_and_a_new_user_send_nothing_again() -> None:
    empty = ProfileState("u1").to_dict()
    folded = fold_batch([click("e1"), click("n1", user="new")], {"u1": empty}.get, PARAMS,
                        unsettled={"u1", "new"})
    assert sorted(versions(folded.deltas)) == [(1, False), (1, False)]


def test_a_user_whose_fold_fails_stays_unsettled_and_sends_nothing() -> None:
    table = folded_twice()
    broken = Event("bad", "u1", 1.7e9 + 3, "review", item_id="i", rating=4, sentiment=0.5,
                   embedding=(None, None))  # type: ignore[arg-type]  # damaged on the internal topic
    folded = fold_batch([broken], table.get, PARAMS, unsettled={"u1"})
    assert folded.failures and folded.deltas == [] and folded.users == []


def test_rounds_re_send_once_when_the_caller_settles_each_confirmed_round() -> None:
    # A user cut into several rounds by the record limit: the recovered delta goes out with the first round only.
    params = ProfileParams(half_life_s=3600.0, weights=PARAMS.weights, top_k=500, max_record_bytes=64 * 1024)
    table = folded_twice()
    unsettled = {"u1"}
    events = [Event(f"c{i}", "u1", 1.7e9 + 10 + i, "click", category=f"{i:03d}" + "c" * 297, item_id="i")
              for i in range(60)]
    rounds = []
    for folded in fold_in_rounds(events, table.get, params, unsettled):
        table.update(folded.writes)
        rounds.append(versions(folded.deltas))
        unsettled.difference_update(folded.users)  # what the worker does once the round's deltas are stored
    assert len(rounds) > 1
    assert rounds[0][0] == (2, True)
    assert all(again is False for later in rounds[1:] for _, again in later)
