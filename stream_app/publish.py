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

import orjson
from aiokafka.partitioner import murmur2
from faust.types import EventT, Message

from schemas.events import Event
from stream_app import metrics
from stream_app.app import app, settings
from stream_app.profile import Delta
from stream_app.pseudonym import pseudonymiser
from stream_app.topics import dead_letters, events_by_user, profile_deltas
from stream_app.triage import Rejection, dead_letter_headers, triage

# Tables and the outbox keep real ids (partitioning, dedup); only what leaves the worker is pseudonymised.
outgoing_user_id = pseudonymiser(settings.pseudonym_key)


def partition_for_user(user_id: str, partitions: int) -> int:
    """aiokafka's (Java-compatible) DefaultPartitioner for a UTF-8 key."""
    return (murmur2(user_id.encode()) & 0x7FFFFFFF) % partitions


def bundle_by_partition(events: Iterable[Event], partitions: int) -> dict[int, list[Event]]:
    bundles: dict[int, list[Event]] = {}
    for event in events:
        bundles.setdefault(partition_for_user(event.user_id, partitions), []).append(event)
    return bundles


def encode_bundle(events: Sequence[Event]) -> bytes:
    return b"[" + b",".join(event.to_json() for event in events) + b"]"


async def publish_events(events: Sequence[Event]) -> None:
    for event_type, count in Counter(event.type for event in events).items():
        metrics.EVENTS.labels(event_type).inc(count)  # once per type and batch: this path runs per event
    topic = events_by_user.get_topic_name()
    for partition, bundle in bundle_by_partition(events, settings.partitions).items():
        await app.producer.send(topic, None, encode_bundle(bundle), partition, None, None)


async def publish_delta(delta: Delta, *, redelivery: bool = False) -> Awaitable[Any]:
    """Hand a delta to the producer; the result completes when the broker has stored it."""
    metrics.DELTAS.labels("redelivery" if redelivery else "new").inc()
    if not redelivery:
        # Freshness: how long after its newest event a profile change reaches subscribers.
        metrics.DELTA_LAG.observe(max(0.0, time.time() - delta["as_of"]))
    user_id = outgoing_user_id(delta["user_id"])
    if user_id != delta["user_id"]:
        delta = {**delta, "user_id": user_id}
    return await app.producer.send(
        profile_deltas.get_topic_name(), user_id.encode(), orjson.dumps(delta), None, None, None
    )


async def publish_dead_letter(message: Message, reason: str) -> None:
    """The original bytes, untouched, with where they came from and why they were refused."""
    metrics.DEAD_LETTERS.labels(metrics.dead_letter_kind(reason)).inc()
    await app.producer.send(dead_letters.get_topic_name(), message.key, message.value, None, None,
                            dead_letter_headers(reason, message))


async def admit(batch: Iterable[EventT]) -> list[tuple[Event, Message]]:
    """The valid events of a micro-batch, with their messages; every other message becomes a dead letter."""
    admitted: list[tuple[Event, Message]] = []
    for stream_event in batch:
        message = stream_event.message
        verdict = triage(settings, message.topic, message.key, message.value)
        if isinstance(verdict, Rejection):
            await publish_dead_letter(message, verdict.reason)
        else:
            admitted.append((verdict, message))
    return admitted
