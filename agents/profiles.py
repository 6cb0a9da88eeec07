"""Profiles: fold micro-batches of by-user events into the profile table and publish deltas."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from faust import StreamT
from faust.types import AgentT, Message

from schemas.events import Event
from stream_app.core.fold import decode_bundle
from stream_app.core.triage import Rejection
from stream_app.ops import metrics
from stream_app.worker.batches import take_batches

if TYPE_CHECKING:
    from stream_app.worker.app import WorkerApp


def event_message(bundle: Message, event: Event) -> Message:
    """One event of a by-user bundle as a message of its own, for its dead letter: the event's JSON keyed by
    its user, at the bundle's topic, partition and offset (the bundle holds other users' events too)."""
    return Message(bundle.topic, bundle.partition, bundle.offset, bundle.timestamp, bundle.timestamp_type,
                   None, event.user_id.encode(), event.to_json(), None)


def register(worker: WorkerApp) -> AgentT:
    settings = worker.settings

    async def update_profiles(stream: StreamT[bytes]) -> AsyncIterator[int]:
        # Events, not values: we need each message's value bytes.
        async for batch in take_batches(stream, settings.batch_max, settings.batch_within_s,
                                        settings.buffer_max_bytes):
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
            await worker.folder.fold(events, origin, event_message)
            await worker.output.confirm_sends()  # the dead letters this agent sent
            yield len(events)

    return worker.app.agent(worker.topics.events_by_user, name="update_profiles")(update_profiles)
