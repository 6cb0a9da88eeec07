"""Profiles: fold micro-batches of by-user events into the profile table and publish deltas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any, cast

from faust import StreamT
from faust.streams import Stream
from faust.types import AgentT, Message

from schemas.events import Event
from stream_app.core.fold import decode_bundle, fold_batch
from stream_app.core.triage import Rejection
from stream_app.ops import metrics

if TYPE_CHECKING:
    from stream_app.worker.app import WorkerApp


def event_message(bundle: Message, event: Event) -> Message:
    """One event of a by-user bundle as a message of its own, for its dead letter: the event's JSON keyed by
    its user, at the bundle's topic, partition and offset (the bundle holds other users' events too)."""
    return Message(bundle.topic, bundle.partition, bundle.offset, bundle.timestamp, bundle.timestamp_type,
                   None, event.user_id.encode(), event.to_json(), None)


def register(worker: WorkerApp) -> AgentT:
    settings, profiles = worker.settings, worker.profiles

    async def update_profiles(stream: StreamT[bytes]) -> AsyncIterator[int]:
        # Deltas of the previous batch not yet acknowledged by the broker.
        unconfirmed_deltas: list[Awaitable[Any]] = []
        # take_events (events, not values) is on the concrete Stream; we need each message's value bytes.
        batches = cast(Stream[bytes], stream).take_events(settings.batch_max, within=settings.batch_within_s)
        async for batch in batches:
            events: list[Event] = []
            origin: dict[int, Message] = {}  # id(event) -> the by-user message it came in
            for stream_event in batch:
                message = stream_event.message
                try:
                    bundle = decode_bundle(message.value)
                except Exception as exc:  # not a bundle this worker wrote: its original bytes are dead-lettered
                    reason = f"not a by-user event bundle: {type(exc).__name__}: {exc}"[:500]
                    await worker.output.dead_letter(message, Rejection("processing_error", reason))
                    continue
                origin.update((id(event), message) for event in bundle)
                events.extend(bundle)
            metrics.BATCH_EVENTS.labels("profiles").observe(len(events))
            folded = fold_batch(events, profiles.get, worker.params)
            for failure in folded.failures:
                for event in failure.events:
                    await worker.output.dead_letter(event_message(origin[id(event)], event),
                                                    Rejection("processing_error", failure.reason))
            for user_id, value in folded.writes.items():
                profiles[user_id] = value
            metrics.DUPLICATES.inc(folded.duplicates)
            # A delta leaves only once the table write of its version is stored: after a crash the restarted
            # worker recovers that version and re-emits the delta when the uncommitted events come again,
            # instead of counting them into a second, different delta with the same version. Waiting for the
            # previous batch's deltas here too (they are long done by now) bounds the deltas a crash can lose
            # to one batch, so they are always still in the profile's outbox.
            await profiles.confirm_writes()
            await asyncio.gather(*unconfirmed_deltas)
            unconfirmed_deltas = [await worker.output.delta(delta, redelivery=again) for delta, again in folded.deltas]
            yield len(events)

    return worker.app.agent(worker.topics.events_by_user, name="update_profiles")(update_profiles)
