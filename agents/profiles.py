"""Profiles: fold micro-batches of by-user events into the profile table and publish deltas."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import orjson
from faust import StreamT
from faust.streams import Stream

from schemas.events import Event, event_from_trusted_doc
from stream_app.app import app, settings
from stream_app.profile import Delta, ProfileParams, ProfileState, apply
from stream_app.publish import publish_delta
from stream_app.tables import profiles
from stream_app.topics import events_by_user

params = ProfileParams.from_settings(settings)


def unbundle(values: Sequence[bytes | None]) -> list[Event]:
    """Events of a micro-batch of by-user bundles (JSON arrays written by `publish_events`)."""
    return [event_from_trusted_doc(doc) for value in values if value for doc in orjson.loads(value)]


def group_by_user(events: Sequence[Event]) -> dict[str, list[Event]]:
    groups: dict[str, list[Event]] = {}
    for event in events:
        groups.setdefault(event.user_id, []).append(event)
    return groups


def update_profile(
    stored: dict[str, Any] | None, user_id: str, events: Sequence[Event]
) -> tuple[dict[str, Any] | None, list[Delta]]:
    """The new table value (None: unchanged) and the deltas to publish, in version order."""
    state = ProfileState.from_dict(stored) if stored is not None else ProfileState(user_id)
    result = apply(state, events, params)
    outgoing = list(result.redeliveries)
    if result.delta is None:
        return None, outgoing
    outgoing.append(result.delta)
    return state.to_dict(), outgoing


@app.agent(events_by_user)
async def update_profiles(stream: StreamT[bytes]) -> AsyncIterator[int]:
    # take_events (events, not values) is on the concrete Stream; we need each message's value bytes.
    async for batch in cast(Stream[bytes], stream).take_events(settings.batch_max, within=settings.batch_within_s):
        events = unbundle([e.message.value for e in batch])
        for user_id, user_events in group_by_user(events).items():
            new_value, outgoing = update_profile(profiles.get(user_id), user_id, user_events)
            if new_value is not None:
                profiles[user_id] = new_value
            for delta in outgoing:
                await publish_delta(delta)
        yield len(events)
