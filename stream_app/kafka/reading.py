"""Reading topics and their offsets with a plain consumer: CLI tools, replay, snapshot and the Redis sink.

Every reader here works on Apache Kafka and on the embedded broker; where the embedded broker answers
differently (end offsets, offsets-for-times), the work-around from `tansu_workarounds` is applied here, once.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from stream_app.kafka.clients import consumer
from stream_app.ops.settings import Settings


async def partitions_of(client: AIOKafkaConsumer, topics: Sequence[str]) -> list[TopicPartition]:
    """Every partition of `topics`, sorted (metadata is fetched lazily: ask for it once if missing)."""
    if any(client.partitions_for_topic(topic) is None for topic in topics):
        await client._client.force_metadata_update()
    return [TopicPartition(topic, p) for topic in topics for p in sorted(client.partitions_for_topic(topic) or ())]


async def read_topic(settings: Settings, topic: str, idle_timeout_s: float = 30.0) -> list[Any]:
    """Every record (aiokafka ConsumerRecord) of a topic from the beginning to its current end.

    The end is the high watermark that fetch responses report (correct on Kafka and on Tansu, whose
    ListOffsets is not), so this reads exactly what was there when it started.
    """
    client = consumer(settings)
    await client.start()
    try:
        tps = await partitions_of(client, [topic])
        if not tps:
            return []
        client.assign(tps)
        await client.seek_to_beginning(*tps)
        records: list[Any] = []
        ends: dict[TopicPartition, int] = {}
        deadline = time.monotonic() + idle_timeout_s
        while len(ends) < len(tps) or any([await _behind(client, tp, end) for tp, end in ends.items()]):
            batch = await client.getmany(timeout_ms=200)
            for tp_records in batch.values():
                records.extend(tp_records)
                deadline = time.monotonic() + idle_timeout_s
            for tp in tps:
                if tp not in ends and client.highwater(tp) is not None:
                    ends[tp] = client.highwater(tp)
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic}: no progress for {idle_timeout_s} s")
        return records
    finally:
        await client.stop()


async def _behind(client: Any, tp: Any, end: int) -> bool:
    return bool(await client.position(tp) < end)


async def end_offsets(settings: Settings, topics: Sequence[str]) -> dict[TopicPartition, int]:
    """Current end offset of every partition of `topics` (corrected on the embedded broker)."""
    client = consumer(settings)
    await client.start()
    try:
        tps = await partitions_of(client, topics)
        listed = dict(await client.end_offsets(tps)) if tps else {}
    finally:
        await client.stop()
    if settings.embedded_broker and listed:
        from stream_app.kafka.tansu_workarounds import true_end_offsets

        return await true_end_offsets(settings.bootstrap_servers, listed)
    return listed


async def committed_offsets(
    settings: Settings, group_id: str, tps: Sequence[TopicPartition]
) -> dict[TopicPartition, int]:
    # A group-less look-up through a consumer (it never joins): Tansu drops the admin OffsetFetch request.
    client = consumer(settings, group_id=group_id)
    await client.start()
    try:
        return {tp: offset for tp in tps if (offset := await client.committed(tp)) is not None}
    finally:
        await client.stop()


async def seed_group_offsets(settings: Settings, group_id: str, topics: Sequence[str], since: float) -> None:
    """Start `group_id` at the first record with a timestamp >= since (the end where there is none)."""
    client = consumer(settings, group_id=group_id)
    await client.start()
    try:
        tps = await partitions_of(client, topics)
        if settings.embedded_broker:
            from stream_app.kafka.tansu_workarounds import offsets_for_times_by_scan

            first = await offsets_for_times_by_scan(settings.bootstrap_servers, tps, int(since * 1000))
        else:
            found = await client.offsets_for_times({tp: int(since * 1000) for tp in tps})
            first = {tp: None if hit is None else hit.offset for tp, hit in found.items()}
        ends = await end_offsets(settings, topics)
        client.assign(tps)
        offsets = {tp: OffsetAndMetadata(ends[tp] if offset is None else offset, "") for tp, offset in first.items()}
        await client.commit(offsets)
    finally:
        await client.stop()




async def read_partition(settings: Settings, tp: TopicPartition, last_offset: int,
                         idle_timeout_s: float = 30.0) -> AsyncIterator[Any]:
    """The records of one partition from its beginning up to `last_offset` (inclusive or beyond)."""
    client = consumer(settings)
    await client.start()
    try:
        client.assign([tp])
        await client.seek_to_beginning(tp)
        deadline = time.monotonic() + idle_timeout_s
        while await client.position(tp) <= last_offset:
            batch = await client.getmany(tp, timeout_ms=200)
            for record in batch.get(tp, []):
                deadline = time.monotonic() + idle_timeout_s
                yield record
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {tp.topic}[{tp.partition}]: no progress for {idle_timeout_s} s")
    finally:
        await client.stop()
