"""Folding events into the profile table and publishing their deltas, for the agent that holds the events.

The profile agent folds what comes over the by-user topic. The input agents (ingest; reviews, once encoded) fold,
themselves, the valid events that
already sit on the partition our partitioner gives their user (where a producer keying by user id with Kafka's
default partitioner puts every event, when the input topic has as many partitions as the by-user topic):
re-keying them through the by-user topic would only hand them back to this worker, at the cost of a
serialisation, a broker round trip and a second fetch. Everything else still takes the hop, so correctness never
depends on how producers partition.

Two agents folding into one table need one lock: a fold reads states, writes them, waits for the broker to store
the writes and only then sends the deltas. Interleaved, two folds of one user could both read version n, or send
that user's deltas out of version order. The lock is held from the first read to the last delta's confirmation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence

import faust
from faust.types import Message

from schemas.events import Event
from stream_app.core.fold import fold_in_rounds
from stream_app.core.profile import ProfileParams
from stream_app.core.triage import Rejection
from stream_app.kafka.partitioning import partition_for_user
from stream_app.ops import metrics
from stream_app.ops.settings import Settings
from stream_app.worker.publish import Output
from stream_app.worker.tables import ProfileTable


class Folder:
    def __init__(self, settings: Settings, app: faust.App, by_user_topic: str, profiles: ProfileTable,
                 output: Output, params: ProfileParams) -> None:
        self.settings, self.app, self.by_user_topic = settings, app, by_user_topic
        self.profiles, self.output, self.params = profiles, output, params
        self.lock = asyncio.Lock()
        # Under exactly_once a table write belongs to the transaction of the input it came from, which Faust
        # ties to the by-user partition: there every event takes the hop, as before.
        self.at_ingest = settings.fold_at_ingest and settings.processing_guarantee == "at_least_once"

    async def fold(self, events: Sequence[Event], messages: Mapping[int, Message],
                   dead_letter_of: Callable[[Message, Event], Message] | None = None) -> None:
        """Fold `events` into the table, write the new states, publish the deltas; every write and delta is
        stored by the broker when this returns. An event the fold refuses is dead-lettered as the message it came
        in (`messages[id(event)]`), or as `dead_letter_of(that message, event)` (confirmed by the calling agent's
        `confirm_sends`)."""
        profiles, output = self.profiles, self.output
        async with self.lock:
            # Rounds keep each delta within the record limit: a user with a big batch gets several versions.
            for folded in fold_in_rounds(events, profiles.stored, self.params, profiles.unsettled):
                for failure in folded.failures:
                    for event in failure.events:
                        message = messages[id(event)]
                        await output.dead_letter(message if dead_letter_of is None else dead_letter_of(message, event),
                                                 Rejection("processing_error", failure.reason))
                await profiles.write_many(folded.writes, folded.encoded)
                metrics.DUPLICATES.inc(folded.duplicates)
                # A delta leaves only once the table write of its version is stored: after a crash the restarted
                # worker recovers that version and re-emits the delta when the uncommitted events come again,
                # instead of counting them into a second, different delta with the same version. The deltas are
                # confirmed before the next round's writes and before the batch is acknowledged (so before its
                # offsets can be committed): a crash can lose only the newest round's deltas, which the outbox
                # always keeps, and a failed send crashes the agent instead of being lost.
                await profiles.confirm_writes()
                if folded.deltas:
                    await asyncio.gather(*await output.deltas(folded.deltas))
                profiles.settle(folded.users)

    async def fold_or_forward(self, admitted: Sequence[tuple[Event, Message]]) -> None:
        """What an input agent does with its valid events: folds those already on their user's partition
        (`split_at_ingest`) and sends the others through the by-user topic. The sends are confirmed by the
        agent's `confirm_sends`, the folds' writes and deltas before this returns. An event the fold refuses is
        dead-lettered as its input record."""
        here, hop = self.split_at_ingest(admitted)
        await self.output.events(hop)
        if here:
            metrics.FOLDED_AT_INGEST.inc(len(here))
            events = [event for event, _ in here]
            self.output.count(events)
            await self.fold(events, {id(event): message for event, message in here})

    def split_at_ingest(self, admitted: Sequence[tuple[Event, Message]]) -> tuple[list[tuple[Event, Message]],
                                                                                 list[Event]]:
        """(events to fold here, with their input messages; events for the by-user hop).

        Here: the input topic has as many partitions as the by-user topic, the event's user hashes to the
        partition it came in on, and this worker holds that by-user partition (so the table partition) now.
        """
        if not self.at_ingest:
            return [], [event for event, _ in admitted]
        partitions, app = self.settings.partitions, self.app
        held = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == self.by_user_topic}
        partitions_of: dict[str, int | None] = {}
        here: list[tuple[Event, Message]] = []
        hop: list[Event] = []
        for event, message in admitted:
            topic = message.topic
            if topic not in partitions_of:
                partitions_of[topic] = app.consumer.topic_partitions(topic)
            if (message.partition in held and partitions_of[topic] == partitions
                    and partition_for_user(event.user_id, partitions) == message.partition):
                here.append((event, message))
            else:
                hop.append(event)
        return here, hop
