"""What the agents write to Kafka, sent straight through the app's producer.

Faust's `Topic.send` costs ~4 Faust objects per message; at tens of thousands of messages per second that
is most of a core. The producer is the same one Faust flushes before committing input offsets, so these
sends keep the at-least-once guarantee.

Validated events travel to `events_by_user` in bundles: one message per target partition per micro-batch,
a JSON array of events. The target partition is the one aiokafka's default partitioner picks for the user id,
which is also where the profile table's changelog (`use_partitioner=True`) puts that user's state. A bundle
that would exceed `PROFILE_MAX_RECORD_BYTES` goes as several messages.

Every send is checked: the producer's result futures of an agent's sends are collected per task, and the
agent awaits them (`confirm_sends`) before it takes its next batch, which is when Faust acknowledges the
input events. A failed send raises there, so the agent crashes before the offsets are committed and the
input is delivered again; nothing is lost silently.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Iterable, Iterator, Sequence
from typing import Any

import faust
import orjson
from faust.types import Message

from schemas.events import Event
from stream_app.core.limits import RECORD_OVERHEAD_BYTES
from stream_app.core.profile import Delta
from stream_app.core.pseudonym import pseudonymiser
from stream_app.core.triage import Rejection
from stream_app.kafka.batched_send import aiokafka_producer, send_batched, topic_partitions
from stream_app.kafka.partitioning import partition_for_user
from stream_app.ops import metrics
from stream_app.ops.settings import Settings
from stream_app.worker.topics import Topics


def bundle_by_partition(events: Iterable[Event], partitions: int) -> dict[int, list[Event]]:
    bundles: dict[int, list[Event]] = {}
    for event in events:
        bundles.setdefault(partition_for_user(event.user_id, partitions), []).append(event)
    return bundles


def pack_bundles(events: Iterable[Event], max_value_bytes: int) -> Iterator[bytes]:
    """JSON arrays of the events, in order, each within `max_value_bytes` (an event is never split)."""
    parts: list[bytes] = []
    size = 2
    for event in events:
        doc = event.to_json()
        if parts and size + len(doc) + 1 > max_value_bytes:
            yield b"[" + b",".join(parts) + b"]"
            parts, size = [], 2
        parts.append(doc)
        size += len(doc) + 1
    if parts:
        yield b"[" + b",".join(parts) + b"]"


def bounded_dead_letter(
    key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]], max_record_bytes: int
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """The dead letter as sent: the original bytes if they fit one record, else a prefix of the value (and
    of the key if it alone is too long), with the original sizes in `dlq.original_size` (value) and
    `dlq.original_key_size` (key)."""
    budget = max_record_bytes - RECORD_OVERHEAD_BYTES - sum(len(k) + len(v) + 8 for k, v in headers)
    key_len, value_len = len(key or b""), len(value or b"")
    if key_len + value_len <= budget:
        return key, value, headers
    headers = [*headers, ("dlq.original_size", str(value_len).encode())]
    budget -= 64
    if key is not None and key_len > budget // 2:
        headers.append(("dlq.original_key_size", str(key_len).encode()))
        budget -= 64
        key = key[: budget // 2]
    return key, (value or b"")[: max(0, budget - len(key or b""))], headers


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
        self.max_record_bytes = settings.max_record_bytes
        # Unconfirmed sends per agent task (each agent runs in its own task), awaited by `confirm_sends`.
        self._pending: dict[asyncio.Task[Any] | None, list[Awaitable[Any]]] = {}
        # Tables and the outbox keep real ids (partitioning, dedup); only what leaves the worker is pseudonymised.
        self.outgoing_user_id = pseudonymiser(settings.pseudonym_key)

    @staticmethod
    def count(events: Iterable[Event]) -> None:
        """profile_events_total, for every valid event however it reaches the table."""
        for event_type, count in Counter(event.type for event in events).items():
            metrics.EVENTS.labels(event_type).inc(count)  # once per type and batch: this path runs per event

    async def events(self, events: Sequence[Event]) -> None:
        self.count(events)
        max_value = self.max_record_bytes - RECORD_OVERHEAD_BYTES
        for partition, bundle in bundle_by_partition(events, self.partitions).items():
            for value in pack_bundles(bundle, max_value):
                self._track(await self.app.producer.send(self.events_topic, None, value, partition, None, None))

    def _track(self, sent: Awaitable[Any]) -> Awaitable[Any]:
        self._pending.setdefault(asyncio.current_task(), []).append(sent)
        return sent

    async def confirm_sends(self) -> None:
        """Wait until the broker has stored every event bundle and dead letter this task sent; raise if one
        failed (the agent then crashes before its input offsets are committed)."""
        pending = self._pending.pop(asyncio.current_task(), [])
        if pending:
            await asyncio.gather(*pending)

    async def deltas(self, deltas: Sequence[tuple[Delta, bool]]) -> list[Awaitable[Any]]:
        """Hand a round's (delta, is_redelivery) pairs to the producer in one batch per partition, keyed and
        partitioned by the outgoing user id as a plain send would be; the results complete when the broker has
        stored them."""
        if not deltas:
            return []
        redelivered = sum(1 for _, again in deltas if again)
        metrics.DELTAS.labels("redelivery").inc(redelivered)  # once per round: this path runs per user
        metrics.DELTAS.labels("new").inc(len(deltas) - redelivered)
        now = time.time()
        # Freshness: how long after its newest event a profile change reaches subscribers.
        metrics.DELTA_LAG.observe_many(max(0.0, now - delta["as_of"]) for delta, again in deltas if not again)
        producer = aiokafka_producer(self.app.producer)
        partitions = await topic_partitions(producer, self.deltas_topic)
        records = []
        for delta, _ in deltas:
            user_id = self.outgoing_user_id(delta["user_id"])
            if user_id != delta["user_id"]:
                delta = {**delta, "user_id": user_id}
            records.append((partition_for_user(user_id, partitions), user_id.encode(), orjson.dumps(delta)))
        return list(await send_batched(producer, self.deltas_topic, records))

    async def dead_letter(self, message: Message, rejection: Rejection) -> Awaitable[Any]:
        """The original bytes, untouched unless they exceed one record (`bounded_dead_letter`), with where they
        came from and why they were refused. Checked by the sending task's `confirm_sends`."""
        metrics.DEAD_LETTERS.labels(rejection.kind).inc()
        key, value, headers = bounded_dead_letter(message.key, message.value, dead_letter_headers(rejection, message),
                                                  self.max_record_bytes)
        return self._track(await self.app.producer.send(self.dead_letters_topic, key, value, None, None, headers))
