"""A worker that reads a user's state from the changelog (a restart, a partition moving to it) sends that state's
newest delta again before the user's next one: it cannot know whether the worker that wrote it sent it."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any
from unittest.mock import AsyncMock

from faust.types import Message

from schemas.events import Event
from stream_app.worker.app import WorkerApp
from tests.agents.test_agents import make_worker, record_outputs

MESSAGE = Message("clicks", 0, 0, 0.0, 0, None, b"u1", b"{}", b"")


def click(event_id: str, ts: float) -> Event:
    return Event(event_id, "u1", ts, "click", item_id="i", category="shoes")


async def fold(worker: WorkerApp, event: Event) -> None:
    await worker.folder.fold([event], {id(event): MESSAGE})


def sent_versions(deltas: AsyncMock) -> list[tuple[int, bool]]:
    return [(delta["version"], again) for call in deltas.await_args_list for delta, again in call.args[0]]


def from_changelog(key: str, value: dict[str, Any]) -> Any:
    """A changelog record as Faust's recovery hands it to the table (key and value deserialised)."""
    return SimpleNamespace(key=key, value=value, message=SimpleNamespace(value=b"{}", partition=0))


async def test_a_recovered_state_sends_its_newest_delta_again_before_the_next_one_and_only_once() -> None:
    crashed = make_worker()
    with record_outputs(crashed):
        await fold(crashed, click("e1", 1.7e9))  # written, and maybe sent: the crash comes before anyone knows
    crashed.encoder.stop()
    state = crashed.profiles["u1"]
    assert [delta["version"] for delta in state["outbox"]] == [1]

    restarted = make_worker()
    restarted.profiles.apply_changelog_batch([from_changelog("u1", state)])
    assert restarted.profiles.unsettled == {"u1"}
    with record_outputs(restarted) as sent:
        await fold(restarted, click("e2", 1.7e9 + 1))  # a fresh event comes before any redelivered one
        await fold(restarted, click("e3", 1.7e9 + 2))
        await fold(restarted, click("e1", 1.7e9))  # the redelivered event: counted, and its delta went out
    restarted.encoder.stop()
    assert sent_versions(sent["deltas"]) == [(1, True), (2, False), (3, False)]
    assert restarted.profiles.unsettled == set()


async def test_users_the_worker_no_longer_holds_leave_the_unsettled_set_at_a_rebalance() -> None:
    worker = make_worker()
    worker.profiles.apply_changelog_batch([from_changelog("u1", {"user_id": "u1"}),
                                           from_changelog("u2", {"user_id": "u2"})])
    assert worker.profiles.unsettled == {"u1", "u2"}
    del worker.profiles.data["u2"]  # what the store does to a revoked partition's keys
    await worker.profiles.on_rebalance(set(), set(), set())
    worker.encoder.stop()
    assert worker.profiles.unsettled == {"u1"}
