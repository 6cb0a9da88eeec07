"""Many records to one topic as one aiokafka batch per partition, instead of one `send` per record.

A worker writes one table record and one delta per touched user per micro-batch: on a backlog of users with
one or two events each, that is two records per event. Each went through Faust's `Producer.send` (a sensor
call, header handling) and aiokafka's `send` (metadata check, partitioner, accumulator lookup, a future per
record). Here the records of one call are appended to one `BatchBuilder` per partition and handed to the
accumulator with `send_batch`: one future per partition batch, which completes when the broker has stored
the whole batch (and fails it as a whole).

Faust's commit flushes aiokafka's accumulator, which holds these batches like any others, so the
at-least-once ordering (outputs stored before input offsets are committed) is unchanged; the callers also
await the futures themselves before acknowledging their input.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError


def aiokafka_producer(faust_producer: Any) -> AIOKafkaProducer:
    """The aiokafka producer under Faust's (faust-streaming 0.15.3 keeps it private; one producer per app)."""
    producer: AIOKafkaProducer = faust_producer._ensure_producer()
    return producer


async def topic_partitions(producer: AIOKafkaProducer, topic: str) -> int:
    """How many partitions `topic` has in the producer's metadata (fetched first if it has none yet): what
    aiokafka's partitioner divides by when `send` picks the partition."""
    await producer.client._wait_on_metadata(topic)
    return len(producer.client.cluster.partitions_for_topic(topic) or ())


async def send_batched(producer: AIOKafkaProducer, topic: str,
                       records: Iterable[tuple[int, bytes | None, bytes]]) -> list[asyncio.Future[Any]]:
    """Queue (partition, key, value) records for `topic`; one future per batch sent, in send order. Records of
    one partition keep their order. A batch is cut where aiokafka's batch size (the producer's
    max_batch_size) is reached; a record over it goes alone, as aiokafka's `send` would let it."""
    builders: dict[int, Any] = {}
    sent: list[asyncio.Future[Any]] = []
    for partition, key, value in records:
        builder = builders.get(partition)
        if builder is None:
            builder = builders[partition] = producer.create_batch()
        if builder.append(key=key, value=value, timestamp=None) is None:
            sent.append(await producer.send_batch(builder, topic, partition=partition))
            builder = builders[partition] = producer.create_batch()
            if builder.append(key=key, value=value, timestamp=None) is None:
                raise MessageSizeTooLargeError(f"a record of {len(value)} bytes does not fit an empty batch")
    for partition, builder in builders.items():  # each holds at least the record it was made for
        sent.append(await producer.send_batch(builder, topic, partition=partition))
    return sent
