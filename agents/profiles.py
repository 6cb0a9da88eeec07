"""Profiles: fold micro-batches of by-user events into the profile table and publish deltas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any, cast

from faust import StreamT
from faust.streams import Stream
from faust.types import AgentT

from stream_app.core.fold import decode_bundles, fold_batch
from stream_app.ops import metrics

if TYPE_CHECKING:
    from stream_app.worker.app import WorkerApp


def register(worker: WorkerApp) -> AgentT:
    settings, profiles = worker.settings, worker.profiles

    async def update_profiles(stream: StreamT[bytes]) -> AsyncIterator[int]:
        # Deltas of the previous batch not yet acknowledged by the broker.
        unconfirmed_deltas: list[Awaitable[Any]] = []
        # take_events (events, not values) is on the concrete Stream; we need each message's value bytes.
        batches = cast(Stream[bytes], stream).take_events(settings.batch_max, within=settings.batch_within_s)
        async for batch in batches:
            events = decode_bundles([e.message.value for e in batch])
            metrics.BATCH_EVENTS.labels("profiles").observe(len(events))
            folded = fold_batch(events, profiles.get, worker.params)
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
