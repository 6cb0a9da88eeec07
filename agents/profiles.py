"""Profiles: fold micro-batches of by-user events into the profile table and publish deltas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, cast

import orjson
from faust import StreamT
from faust.streams import Stream

from schemas.events import Event, event_from_trusted_doc
from stream_app import metrics
from stream_app.app import app, settings
from stream_app.profile import ApplyResult, Delta, ProfileParams, ProfileState, apply
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
) -> tuple[dict[str, Any] | None, ApplyResult]:
    """The new table value (None: unchanged) and what to publish."""
    state = ProfileState.from_dict(stored) if stored is not None else ProfileState(user_id)
    result = apply(state, events, params)
    return (None if result.delta is None else state.to_dict()), result


@app.agent(events_by_user)
async def update_profiles(stream: StreamT[bytes]) -> AsyncIterator[int]:
    # Deltas of the previous batch not yet acknowledged by the broker.
    unconfirmed_deltas: list[Awaitable[Any]] = []
    # take_events (events, not values) is on the concrete Stream; we need each message's value bytes.
    async for batch in cast(Stream[bytes], stream).take_events(settings.batch_max, within=settings.batch_within_s):
        events = unbundle([e.message.value for e in batch])
        metrics.BATCH_EVENTS.labels("profiles").observe(len(events))
        outgoing: list[tuple[Delta, bool]] = []
        duplicates = 0
        for user_id, user_events in group_by_user(events).items():
            new_value, result = update_profile(profiles.get(user_id), user_id, user_events)
            if new_value is not None:
                profiles[user_id] = new_value
            counted = len(result.delta["event_ids"]) if result.delta is not None else 0
            duplicates += len(user_events) - counted
            # Re-emissions first: their versions are older than the new delta's.
            outgoing.extend((delta, True) for delta in result.redeliveries)
            if result.delta is not None:
                outgoing.append((result.delta, False))
        # A delta leaves only once the table write of its version is stored: after a crash the restarted
        # worker recovers that version and re-emits the delta when the uncommitted events come again,
        # instead of counting them into a second, different delta with the same version. Waiting for the
        # previous batch's deltas here too (they are long done by now) bounds the deltas a crash can lose
        # to one batch, so they are always still in the profile's outbox.
        metrics.DUPLICATES.inc(duplicates)
        await profiles.confirm_writes()
        await asyncio.gather(*unconfirmed_deltas)
        unconfirmed_deltas = [await publish_delta(delta, redelivery=again) for delta, again in outgoing]
        yield len(events)
