"""Records as one aiokafka batch per partition (stream_app/kafka/batched_send.py), with aiokafka's own builder."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.memory_records import MemoryRecords

from stream_app.kafka.batched_send import send_batched


class Accumulator:
    """create_batch/send_batch of an AIOKafkaProducer, with real BatchBuilders of `batch_size` bytes."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.sent: list[tuple[str, int, list[tuple[bytes | None, bytes]]]] = []

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(self.batch_size, 0, is_transactional=False)

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> asyncio.Future[Any]:
        records = [(r.key, r.value) for r in MemoryRecords(bytes(batch._build())).next_batch()]
        self.sent.append((topic, partition, records))
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


async def test_one_batch_per_partition_in_record_order() -> None:
    producer = Accumulator(batch_size=1 << 20)
    records = [(1, b"a", b"1"), (0, b"b", b"2"), (1, b"c", b"3"), (0, None, b"4")]
    futures = await send_batched(producer, "deltas", records)
    assert len(futures) == 2 and all(f.done() for f in futures)
    assert sorted(producer.sent) == [("deltas", 0, [(b"b", b"2"), (None, b"4")]),
                                     ("deltas", 1, [(b"a", b"1"), (b"c", b"3")])]


async def test_a_full_batch_goes_and_the_next_record_starts_another() -> None:
    producer = Accumulator(batch_size=400)
    records = [(0, f"k{i}".encode(), bytes(100)) for i in range(10)]
    await send_batched(producer, "t", records)
    batches = [batch for _, _, batch in producer.sent]
    assert len(batches) > 2 and all(len(batch) <= 4 for batch in batches)
    assert [key for batch in batches for key, _ in batch] == [f"k{i}".encode() for i in range(10)]


async def test_a_record_over_the_batch_size_goes_alone() -> None:
    # aiokafka's builder always takes a batch's first record; our record limit bounds it before it gets here.
    producer = Accumulator(batch_size=200)
    await send_batched(producer, "t", [(0, b"small", b"x"), (0, b"big", bytes(1000))])
    assert [[key for key, _ in batch] for _, _, batch in producer.sent] == [[b"small"], [b"big"]]


async def test_a_closed_empty_batch_is_an_error_not_a_lost_record() -> None:
    class Refusing(Accumulator):
        def create_batch(self) -> BatchBuilder:
            builder = super().create_batch()
            builder.close()
            return builder

    with pytest.raises(MessageSizeTooLargeError):
        await send_batched(Refusing(batch_size=1 << 20), "t", [(0, b"k", b"v")])
