"""Each agent driven through Faust's `agent.test_context()`: no broker, real agent code."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any
from unittest.mock import AsyncMock, MagicMock, patch

import faust
import orjson
import pytest

from agents.ingest import ingest
from agents.profiles import update_profiles
from agents.reviews import encode_reviews, use_encoder
from schemas.events import Event
from stream_app.encoder import FakeEncoder
from stream_app.publish import encode_bundle
from stream_app.tables import profiles


def stored(*_args: Any, **_kwargs: Any) -> asyncio.Future[None]:
    """What publish_delta returns: a send the broker has already acknowledged."""
    done = asyncio.get_running_loop().create_future()
    done.set_result(None)
    return done


@pytest.fixture
def sent() -> Iterator[dict[str, AsyncMock]]:
    with patch("agents.ingest.publish_events", new_callable=AsyncMock) as events, \
         patch("stream_app.publish.publish_dead_letter", new_callable=AsyncMock) as dlq, \
         patch("agents.reviews.publish_events", new_callable=AsyncMock) as reviews, \
         patch("agents.reviews.publish_dead_letter", new_callable=AsyncMock) as review_dlq, \
         patch("agents.profiles.publish_delta", new_callable=AsyncMock, side_effect=stored) as deltas, \
         patch.object(profiles, "send_changelog") as changelog:
        changelog.return_value.message.partition = 0
        yield {"events": events, "dlq": dlq, "deltas": deltas, "reviews": reviews, "review_dlq": review_dlq}
    profiles.data.clear()


async def test_ingest_rekeys_valid_events_and_dead_letters_the_rest(sent: dict[str, AsyncMock]) -> None:
    good = {"event_id": "e1", "user_id": "u1", "ts": "2024-01-01T00:00:00Z", "type": "click", "item_id": "i"}
    async with ingest.test_context() as agent:
        await agent.put(b"{broken", key=b"u9")
        await agent.put(orjson.dumps(good), key=b"whatever-the-producer-used")
        await agent.put(orjson.dumps(good), key=None)
    dead = [(call.args[0].value, call.args[1]) for call in sent["dlq"].await_args_list]
    assert dead[0][0] == b"{broken" and dead[0][1].startswith("not valid JSON")
    assert dead[1][1] == "message key does not match user_id"
    assert len(dead) == 2
    forwarded = [event for call in sent["events"].await_args_list for event in call.args[0]]
    assert forwarded == [Event("e1", "u1", 1704067200.0, "click", item_id="i")]


async def test_profiles_agent_updates_table_and_publishes_versioned_deltas(sent: dict[str, AsyncMock]) -> None:
    def bundle(eid: str, ts: float) -> bytes:
        return encode_bundle([Event(eid, "u1", ts, "click", category="shoes", item_id="i")])

    async with update_profiles.test_context() as agent:
        await agent.put(bundle("e1", 0.0))
        await agent.put(bundle("e1", 0.0))  # duplicate delivery
        await agent.put(bundle("e2", 604800.0))
    deltas = [call.args[0] for call in sent["deltas"].await_args_list]
    # The duplicate re-emits the delta that counted it (v1) instead of making a new version.
    assert [(d["version"], d["event_ids"]) for d in deltas] == [(1, ["e1"]), (1, ["e1"]), (2, ["e2"])]
    assert profiles["u1"]["version"] == 2
    assert profiles["u1"]["activity"]["click"] == pytest.approx(1.0 + 2.0)  # stored relative to landmark 0


async def test_reviews_agent_encodes_drops_text_and_dead_letters_bad_reviews(sent: dict[str, AsyncMock]) -> None:
    encoder = FakeEncoder()
    use_encoder(encoder)  # the real model has its own tests; this one is about the agent's plumbing
    try:
        review = {"event_id": "r1", "user_id": "u1", "ts": 100, "type": "review", "item_id": "i",
                  "text": "good fit", "rating": 5, "category": "dresses"}
        async with encode_reviews.test_context() as agent:
            await agent.put(orjson.dumps(review), key=b"u1")
            await agent.put(orjson.dumps({**review, "event_id": "r2", "rating": 9}), key=b"u1")
            await agent.put(orjson.dumps({**review, "event_id": "r3", "text": "bad seams"}), key=b"u1")
    finally:
        use_encoder(None)
    dead = [call.args[1] for call in sent["dlq"].await_args_list]
    assert dead == ["rating 9 is out of range 1-5"]
    assert sent["review_dlq"].await_count == 0  # that one is for texts the encoder fails on
    forwarded = [event for call in sent["reviews"].await_args_list for event in call.args[0]]
    assert [e.event_id for e in forwarded] == ["r1", "r3"]
    expected = [encoder.forward(encoder.tokenize([text]))[0] for text in ("good fit", "bad seams")]
    for event, encoded in zip(forwarded, expected, strict=True):
        assert event.text is None  # review text does not travel past the encoder
        assert event.embedding == encoded.embedding and event.sentiment == encoded.sentiment
        assert event.rating == 5 and event.category == "dresses"


class PendingWrite(asyncio.Future[None]):
    """A changelog write the broker has not acknowledged yet."""

    message = MagicMock(partition=0)


async def until(condition: Callable[[], object], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_delta_is_published_only_after_its_table_write_is_stored() -> None:
    # Otherwise a crash between the two keeps the delta but loses the version it announces (see ProfileTable).
    writes: list[PendingWrite] = []

    def send_changelog(*_args: Any, **_kwargs: Any) -> PendingWrite:
        writes.append(PendingWrite())
        return writes[-1]

    event = Event("e1", "u1", 0.0, "click", item_id="i")
    with patch("agents.profiles.publish_delta", new_callable=AsyncMock, side_effect=stored) as deltas, \
         patch.object(faust.Table, "send_changelog", side_effect=send_changelog):
        try:
            async with update_profiles.test_context() as agent:
                await agent.put(encode_bundle([event]), wait=False)
                await until(lambda: writes)
                await asyncio.sleep(0.2)  # room for a premature send; nothing can be waited on for its absence
                assert deltas.await_count == 0
                writes[0].set_result(None)
                await until(lambda: deltas.await_count == 1)
        finally:
            profiles.data.clear()
    assert deltas.await_args is not None and deltas.await_args.args[0]["version"] == 1


async def test_review_micro_batches_close_on_size_or_on_time(sent: dict[str, AsyncMock],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from agents import reviews as reviews_module

    monkeypatch.setattr(reviews_module.settings, "review_batch_max", 2)
    monkeypatch.setattr(reviews_module.settings, "review_batch_within_s", 1.5)
    use_encoder(FakeEncoder())
    try:
        async with encode_reviews.test_context() as agent:
            started = time.monotonic()
            for index in range(3):
                review = {"event_id": f"r{index}", "user_id": "u1", "ts": 100 + index, "type": "review",
                          "item_id": "i", "text": f"review number {index}"}
                await agent.put(orjson.dumps(review), key=b"u1", wait=False)
            await until(lambda: sent["reviews"].await_count >= 1)
            full_after = time.monotonic() - started
            await until(lambda: sent["reviews"].await_count >= 2)
            partial_after = time.monotonic() - started
    finally:
        use_encoder(None)
    batches = [[e.event_id for e in call.args[0]] for call in sent["reviews"].await_args_list]
    assert batches == [["r0", "r1"], ["r2"]]
    assert full_after < 1.0  # a full batch does not wait for `within`
    assert partial_after >= 1.4  # the last one waited for `within`, then went alone


class PoisonSensitiveEncoder(FakeEncoder):
    """Fails any forward pass that contains the text 'poison', like a model choking on one input."""

    def forward(self, inputs: list[list[int]]) -> list[Any]:
        if any(b"poison" in bytes(ids) for ids in inputs):
            raise ValueError("cannot encode")
        return super().forward(inputs)


async def test_a_text_the_encoder_fails_on_is_dead_lettered_and_the_rest_of_its_batch_is_not(
    sent: dict[str, AsyncMock], monkeypatch: pytest.MonkeyPatch
) -> None:
    from agents import reviews as reviews_module

    monkeypatch.setattr(reviews_module.settings, "review_batch_max", 3)
    use_encoder(PoisonSensitiveEncoder())
    try:
        async with encode_reviews.test_context() as agent:
            for index, text in enumerate(["fine one", "poison pill", "fine two"]):
                review = {"event_id": f"r{index}", "user_id": "u1", "ts": 100 + index, "type": "review",
                          "item_id": "i", "text": text}
                await agent.put(orjson.dumps(review), key=b"u1", wait=False)
            await until(lambda: sent["reviews"].await_count >= 1)
    finally:
        use_encoder(None)
    dead = [(orjson.loads(call.args[0].value)["event_id"], call.args[1]) for call in sent["review_dlq"].await_args_list]
    assert dead == [("r1", "encoder failed on this text: ValueError")]
    assert [e.event_id for call in sent["reviews"].await_args_list for e in call.args[0]] == ["r0", "r2"]
