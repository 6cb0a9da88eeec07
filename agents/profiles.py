"""Profiles: fold micro-batches of by-user events into the profile table and publish deltas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, cast

from faust import StreamT
from faust.streams import Stream
from faust.types import AgentT

from stream_app.core.fold import decode_bundles, fold_batch
from stream_app.core.limits import split_rounds
from stream_app.ops import metrics

if TYPE_CHECKING:
    from stream_app.worker.app import WorkerApp


def register(worker: WorkerApp) -> AgentT:
    settings, profiles = worker.settings, worker.profiles

    async def update_profiles(stream: StreamT[bytes]) -> AsyncIterator[int]:
        # take_events (events, not values) is on the concrete Stream; we need each message's value bytes.
        batches = cast(Stream[bytes], stream).take_events(settings.batch_max, within=settings.batch_within_s)
        async for batch in batches:
            events = decode_bundles([e.message.value for e in batch])
            metrics.BATCH_EVENTS.labels("profiles").observe(len(events))
            # Rounds keep each delta within the record limit: a user with a big batch gets several versions.
            for round_events in split_rounds(events, profiles.get, settings.max_record_bytes):
                folded = fold_batch(round_events, profiles.get, worker.params)
                for user_id, value in folded.writes.items():
                    profiles[user_id] = value
                metrics.DUPLICATES.inc(folded.duplicates)
                # A delta leaves only once the table write of its version is stored: after a crash the restarted
                # worker recovers that version and re-emits the delta when the uncommitted events come again,
                # instead of counting them into a second, different delta with the same version. The deltas are
                # confirmed before the next round's writes and before the batch is acknowledged (so before its
                # offsets can be committed): a crash can lose only the newest round's deltas, which the outbox
                # always keeps, and a failed send crashes the agent instead of being lost.
                await profiles.confirm_writes()
                sent = [await worker.output.delta(delta, redelivery=again) for delta, again in folded.deltas]
                await asyncio.gather(*sent)
            await worker.output.confirm_sends()  # any dead letter this agent sent
            yield len(events)

    return worker.app.agent(worker.topics.events_by_user, name="update_profiles")(update_profiles)
