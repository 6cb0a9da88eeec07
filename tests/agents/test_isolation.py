"""Poison isolation in the agents, bad clocks at ingest, and the crash path (no zombie workers).

Driven through Faust's `agent.test_context()` on a built worker, outputs recorded. The process exit of a
crashed agent is replaced by a recorder (monkeypatch), since it would end pytest.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import pytest

import stream_app.worker.folding
from schemas.events import Event
from stream_app.core.fold import encode_bundle
from stream_app.core.profile import ProfileState, apply
from stream_app.encoding.encoder import Encoded, FakeEncoder
from stream_app.worker import health
from stream_app.worker.app import WorkerApp
from tests.agents.test_agents import forwarded, make_worker, published, record_outputs, until


@pytest.fixture
def worker() -> Iterator[WorkerApp]:
    built = make_worker()
    yield built
    built.encoder.stop()


def dead_letters(sent: dict[str, Any]) -> list[tuple[Any, str, str]]:
    return [(call.args[0], call.args[1].kind, call.args[1].reason) for call in sent["dlq"].await_args_list]


async def test_one_users_failing_fold_is_dead_lettered_and_the_rest_of_the_batch_goes_on(
    worker: WorkerApp, exits: list[int]
) -> None:
    good = Event("g1", "u1", 1.7e9, "click", category="shoes", item_id="i")
    # Events on the internal topic come from our own agents; this one is damaged (an embedding of nulls),
    # and apply() raises a TypeError on it half-way through u2's events.
    u2_fine = Event("p0", "u2", 1.7e9, "click", item_id="i")
    poison_doc = {"event_id": "p1", "user_id": "u2", "ts": 1.7e9, "type": "review", "item_id": "i",
                  "sentiment": 0.1, "embedding": [None, None]}
    bundle = b"[" + b",".join([good.to_json(), u2_fine.to_json(), orjson.dumps(poison_doc)]) + b"]"
    before = _profile_of("u2", 1.6e9, worker)
    with record_outputs(worker) as sent:
        worker.profiles["u2"] = copy.deepcopy(before)
        async with worker.agents["update_profiles"].test_context() as agent:
            await agent.put(bundle, partition=2)
            await agent.put(b"not a bundle", partition=1)
            await agent.put(encode_bundle([Event("g2", "u1", 1.7e9 + 1, "click", item_id="i")]))
    assert exits == []  # nothing crashed
    letters = dead_letters(sent)
    assert [(m.key, orjson.loads(m.value)["event_id"], m.partition, m.offset, kind) for m, kind, _ in letters[:2]] \
        == [(b"u2", "p0", 2, 0, "processing_error"), (b"u2", "p1", 2, 0, "processing_error")]
    assert letters[0][2].startswith("profile update failed: TypeError: ")
    assert letters[1][0].topic == letters[0][0].topic == worker.topics.events_by_user.get_topic_name()
    assert (letters[2][0].value, letters[2][0].partition, letters[2][0].offset, letters[2][1]) \
        == (b"not a bundle", 1, 1, "processing_error")
    assert letters[2][2].startswith("not a by-user event bundle: JSONDecodeError")
    assert len(letters) == 3
    # u1's events count, in versions 1 and 2; u2's profile is exactly what it was.
    deltas = published(sent["deltas"])
    assert [(d["user_id"], d["version"], d["event_ids"]) for d in deltas] == [("u1", 1, ["g1"]), ("u1", 2, ["g2"])]
    assert worker.profiles["u2"] == before


def _profile_of(user: str, ts: float, worker: WorkerApp) -> dict[str, Any]:
    state = ProfileState(user)
    apply(state, [Event(f"{user}-old", user, ts, "click", item_id="i")], worker.params)
    return state.to_dict()


class NonFiniteEncoder(FakeEncoder):
    """NOT a model: FakeEncoder, except that texts containing "nan"/"inf" get a non-finite result."""

    def forward(self, inputs: list[list[int]]) -> list[Encoded]:
        results = super().forward(inputs)
        out = []
        for ids, encoded in zip(inputs, results, strict=True):
            text = bytes(i for i in ids if i < 256)
            if b"nan" in text:
                encoded = Encoded(encoded.embedding, math.nan)
            elif b"inf" in text:
                encoded = Encoded((math.inf, *encoded.embedding[1:]), encoded.sentiment)
            out.append(encoded)
        return out


def review(index: int, text: str) -> bytes:
    return orjson.dumps({"event_id": f"r{index}", "user_id": "u1", "ts": 1.7e9 + index, "type": "review",
                         "item_id": "i", "text": text})


async def test_a_non_finite_encoder_result_is_dead_lettered_and_the_rest_go_on() -> None:
    worker = make_worker(NonFiniteEncoder(), review_batch_max=4, review_batch_within_s=3600.0)
    with record_outputs(worker) as sent:
        async with worker.agents["encode_reviews"].test_context() as agent:
            for index, text in enumerate(["fine one", "a nan here", "to infinity", "fine two"]):
                await agent.put(review(index, text), key=b"u1", wait=False)
            await until(lambda: sent["events"].await_count >= 1)
    worker.encoder.stop()
    assert [(orjson.loads(m.value)["event_id"], kind, reason) for m, kind, reason in dead_letters(sent)] == [
        ("r1", "encoder_error", "encoder returned a non-finite sentiment"),
        ("r2", "encoder_error", "encoder returned a non-finite embedding"),
    ]
    assert [e.event_id for e in forwarded(sent)] == ["r0", "r3"]


async def test_an_event_stamped_more_than_max_future_s_ahead_is_dead_lettered_at_ingest(worker: WorkerApp) -> None:
    now = time.time()
    ok = {"event_id": "ok", "user_id": "u1", "ts": now + 3600, "type": "click", "item_id": "i"}
    ahead = {**ok, "event_id": "ahead", "ts": now + 2 * 86400}
    year_2199 = {**ok, "event_id": "2199", "ts": "2199-01-01T00:00:00Z"}
    with record_outputs(worker) as sent:
        async with worker.agents["ingest"].test_context() as agent:
            for doc in (ok, ahead, year_2199):
                await agent.put(orjson.dumps(doc), key=b"u1")
    assert [e.event_id for e in forwarded(sent)] == ["ok"]
    letters = dead_letters(sent)
    assert [(orjson.loads(m.value)["event_id"], kind) for m, kind, _ in letters] == [
        ("ahead", "future_timestamp"), ("2199", "future_timestamp")]
    assert "past the wall clock at ingest" in letters[0][2] and "more than the 86400 s allowed" in letters[0][2]


async def test_a_crashing_agent_makes_ready_fail_and_exits_with_code_70(
    worker: WorkerApp, exits: list[int], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> Any:  # an injected fault outside the per-user isolation
        raise RuntimeError("injected fault")

    monkeypatch.setattr(stream_app.worker.folding, "fold_in_rounds", broken)
    assert worker.readiness["agents_running"]()
    with record_outputs(worker) as sent:
        async with worker.agents["update_profiles"].test_context() as agent:
            await agent.put(encode_bundle([Event("e1", "u1", 1.7e9, "click", item_id="i")]), wait=False)
            await until(lambda: exits)
    assert exits == [health.EXIT_AGENT_CRASHED] == [70]
    assert not worker.readiness["agents_running"]()  # /ready answers 503 from the crash on
    assert "agent update_profiles crashed (RuntimeError: injected fault); exiting with code 70" in caplog.text
    assert sent["deltas"].await_count == 0 and sent["dlq"].await_count == 0


async def test_a_profile_built_with_another_half_life_stops_the_worker_with_code_78_and_dead_letters_nothing(
    worker: WorkerApp, exits: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    other = ProfileState("u1", version=3, landmark=1.6e9, as_of=1.6e9, half_life_s=3600.0,
                         activity={"click": 1.0}).to_dict()
    with record_outputs(worker) as sent:
        worker.profiles["u1"] = copy.deepcopy(other)
        async with worker.agents["update_profiles"].test_context() as agent:
            await agent.put(encode_bundle([Event("e1", "u1", 1.7e9, "click", item_id="i")]), wait=False)
            await until(lambda: exits)
    assert exits == [health.EXIT_INCOMPATIBLE_STATE] == [78]
    assert "profile 'u1' was built with half-life 3600.0 s, settings say 604800.0 s" in caplog.text
    assert sent["deltas"].await_count == 0 and sent["dlq"].await_count == 0
    assert worker.profiles["u1"] == other


def test_every_agent_of_the_roster_is_supervised(worker: WorkerApp) -> None:
    names: Sequence[str] = sorted(worker.agents)
    assert names == ["encode_reviews", "ingest", "update_profiles"]
    for agent in worker.agents.values():
        assert agent.fun.__code__.co_name == "supervised", agent.name  # type: ignore[attr-defined]
