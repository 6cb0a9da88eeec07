"""What the agents write to Kafka, sent straight through the app's producer.

Faust's `Topic.send` costs ~4 Faust objects per message; at tens of thousands of messages per second that
is most of a core. The producer is the same one Faust flushes before committing input offsets, so these
sends keep the at-least-once guarantee.

Validated events travel to `events_by_user` in bundles: one message per target partition per micro-batch,
a JSON array of events. The target partition is the one aiokafka's default partitioner picks for the user id,
which is also where the profile table's changelog (`use_partitioner=True`) puts that user's state.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any

import faust
import orjson
from faust.types import Message

from schemas.events import Event
from stream_app.core.fold import encode_bundle
from stream_app.core.profile import Delta
from stream_app.core.pseudonym import pseudonymiser
from stream_app.core.triage import Rejection
from stream_app.kafka.partitioning import partition_for_user
from stream_app.ops import metrics
from stream_app.ops.settings import Settings
from stream_app.worker.topics import Topics


def bundle_by_partition(events: Iterable[Event], partitions: int) -> dict[int, list[Event]]:
    bundles: dict[int, list[Event]] = {}
    for event in events:
        bundles.setdefault(partition_for_user(event.user_id, partitions), []).append(event)
    return bundles


def dead_letter_headers(rejection: Rejection, message: Message) -> list[tuple[str, bytes]]:
    """Where the original bytes came from and why they were refused (the value itself stays untouched)."""
    return [
        ("dlq.kind", rejection.kind.encode()),
        ("dlq.reason", rejection.reason.encode()),
        ("dlq.topic", message.topic.encode()),
        ("dlq.partition", str(message.partition).encode()),
        ("dlq.offset", str(message.offset).encode()),
    ]


class Output:
    """The worker's three outputs: event bundles by user, profile deltas, dead letters."""

    def __init__(self, app: faust.App, settings: Settings, topics: Topics) -> None:
        self.app = app
        self.partitions = settings.partitions
        self.events_topic = topics.events_by_user.get_topic_name()
        self.deltas_topic = topics.profile_deltas.get_topic_name()
        self.dead_letters_topic = topics.dead_letters.get_topic_name()
        # Tables and the outbox keep real ids (partitioning, dedup); only what leaves the worker is pseudonymised.
        self.outgoing_user_id = pseudonymiser(settings.pseudonym_key)

    async def events(self, events: Sequence[Event]) -> None:
        for event_type, count in Counter(event.type for event in events).items():
            metrics.EVENTS.labels(event_type).inc(count)  # once per type and batch: this path runs per event
        for partition, bundle in bundle_by_partition(events, self.partitions).items():
            await self.app.producer.send(self.events_topic, None, encode_bundle(bundle), partition, None, None)

    async def delta(self, delta: Delta, *, redelivery: bool = False) -> Awaitable[Any]:
        """Hand a delta to the producer; the result completes when the broker has stored it."""
        metrics.DELTAS.labels("redelivery" if redelivery else "new").inc()
        if not redelivery:
            # Freshness: how long after its newest event a profile change reaches subscribers.
            metrics.DELTA_LAG.observe(max(0.0, time.time() - delta["as_of"]))
        user_id = self.outgoing_user_id(delta["user_id"])
        if user_id != delta["user_id"]:
            delta = {**delta, "user_id": user_id}
        return await self.app.producer.send(self.deltas_topic, user_id.encode(), orjson.dumps(delta), None, None, None)

    async def dead_letter(self, message: Message, rejection: Rejection) -> None:
        """The original bytes, untouched, with where they came from and why they were refused."""
        metrics.DEAD_LETTERS.labels(rejection.kind).inc()
        await self.app.producer.send(self.dead_letters_topic, message.key, message.value, None, None,
                                     dead_letter_headers(rejection, message))
