"""Each agent driven through Faust's `agent.test_context()`: no broker, real agent code."""

from __future__ import annotations

from collections.abc import Iterator
from unittest.mock import AsyncMock, patch

import orjson
import pytest

from agents.ingest import ingest
from agents.profiles import update_profiles
from agents.reviews import encode_reviews, use_encoder
from schemas.events import Event
from stream_app.encoder import FakeEncoder
from stream_app.publish import encode_bundle
from stream_app.tables import profiles


@pytest.fixture
def sent() -> Iterator[dict[str, AsyncMock]]:
    with patch("agents.ingest.publish_events", new_callable=AsyncMock) as events, \
         patch("agents.ingest.publish_dead_letter", new_callable=AsyncMock) as dlq, \
         patch("agents.reviews.publish_events", new_callable=AsyncMock) as reviews, \
         patch("agents.reviews.publish_dead_letter", new_callable=AsyncMock) as review_dlq, \
         patch("agents.profiles.publish_delta", new_callable=AsyncMock) as deltas, \
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
    dead = [call.args[1] for call in sent["review_dlq"].await_args_list]
    assert dead == ["rating 9 is out of range 1-5"]
    forwarded = [event for call in sent["reviews"].await_args_list for event in call.args[0]]
    assert [e.event_id for e in forwarded] == ["r1", "r3"]
    expected = [encoder.forward(encoder.tokenize([text]))[0] for text in ("good fit", "bad seams")]
    for event, encoded in zip(forwarded, expected, strict=True):
        assert event.text is None  # review text does not travel past the encoder
        assert event.embedding == encoded.embedding and event.sentiment == encoded.sentiment
        assert event.rating == 5 and event.category == "dresses"
