"""Each agent driven through Faust's `agent.test_context()`: no broker, real agent code."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from unittest.mock import AsyncMock, patch

import orjson
import pytest

from agents.ingest import ingest
from agents.profiles import update_profiles
from schemas.events import Event, event_from_trusted_json
from stream_app.tables import profiles
from stream_app.topics import dead_letters, events_by_user, profile_deltas


@pytest.fixture
def sent() -> Iterator[dict[str, AsyncMock]]:
    with patch.object(events_by_user, "send", new_callable=AsyncMock) as by_user, \
         patch.object(dead_letters, "send", new_callable=AsyncMock) as dlq, \
         patch.object(profile_deltas, "send", new_callable=AsyncMock) as deltas, \
         patch.object(profiles, "send_changelog") as changelog:
        changelog.return_value.message.partition = 0
        yield {"by_user": by_user, "dlq": dlq, "deltas": deltas}
    profiles.data.clear()


def _calls(mock: AsyncMock) -> list[dict[str, Any]]:
    return [call.kwargs for call in mock.await_args_list]


async def test_ingest_rekeys_valid_events_and_dead_letters_the_rest(sent: dict[str, AsyncMock]) -> None:
    good = {"event_id": "e1", "user_id": "u1", "ts": "2024-01-01T00:00:00Z", "type": "click", "item_id": "i"}
    async with ingest.test_context() as agent:
        await agent.put(b"{broken", key=b"u9")
        await agent.put(orjson.dumps(good), key=b"whatever-the-producer-used")
        await agent.put(orjson.dumps(good), key=None)
    dead = _calls(sent["dlq"])
    assert len(dead) == 2
    assert dead[0]["value"] == b"{broken" and dead[0]["key"] == b"u9"
    headers = dict(dead[0]["headers"])
    assert headers["dlq.reason"].startswith(b"not valid JSON")
    assert set(headers) == {"dlq.reason", "dlq.topic", "dlq.partition", "dlq.offset"}
    assert dict(dead[1]["headers"])["dlq.reason"] == b"message key does not match user_id"
    forwarded = _calls(sent["by_user"])
    assert [c["key"] for c in forwarded] == ["u1"]
    assert event_from_trusted_json(forwarded[0]["value"]) == Event("e1", "u1", 1704067200.0, "click", item_id="i")


async def test_profiles_agent_updates_table_and_publishes_versioned_deltas(sent: dict[str, AsyncMock]) -> None:
    def by_user(eid: str, ts: float) -> bytes:
        return Event(eid, "u1", ts, "click", category="shoes", item_id="i").to_json()

    async with update_profiles.test_context() as agent:
        await agent.put(by_user("e1", 0.0), key="u1")
        await agent.put(by_user("e1", 0.0), key="u1")  # duplicate delivery
        await agent.put(by_user("e2", 604800.0), key="u1")
    deltas = [orjson.loads(c["value"]) for c in _calls(sent["deltas"])]
    # The duplicate re-emits the delta that counted it (v1) instead of making a new version.
    assert [(d["version"], d["event_ids"]) for d in deltas] == [(1, ["e1"]), (1, ["e1"]), (2, ["e2"])]
    assert profiles["u1"]["version"] == 2
    assert profiles["u1"]["activity"]["click"] == pytest.approx(1.0 + 2.0)  # stored relative to landmark 0
