"""Each embedded-broker work-around, with a test that fails without it (see stream_app.kafka.tansu_workarounds)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from stream_app.kafka import tansu_workarounds
from stream_app.kafka.clients import consumer, producer
from stream_app.kafka.embedded_broker import EmbeddedBroker
from stream_app.ops.settings import Settings
from stream_app.worker.app import faust_config

pytestmark = pytest.mark.integration

T = TypeVar("T")


def embedded(broker: EmbeddedBroker, **kwargs: object) -> Settings:
    return Settings(broker_url=broker.url, embedded_broker=True, **kwargs)  # type: ignore[arg-type]


async def write(settings: Settings, topic: str, bursts: Sequence[Sequence[int | None]]) -> None:
    """Records to partition 0; each burst is sent together (one batch on the broker), each entry is a
    record's timestamp in ms (None: now)."""
    client = producer(settings, linger_ms=0)
    await client.start()
    try:
        for burst in bursts:
            await asyncio.gather(*[await client.send(topic, b"x", partition=0, timestamp_ms=ts) for ts in burst])
    finally:
        await client.stop()


async def ask(settings: Settings, question: Callable[[AIOKafkaConsumer], Awaitable[T]]) -> T:
    reader = consumer(settings)
    await reader.start()
    try:
        return await question(reader)
    finally:
        await reader.stop()


async def test_list_offsets_is_short_and_fetch_high_watermark_is_not(broker: EmbeddedBroker) -> None:
    settings = embedded(broker)
    topic = "workaround-end-offsets"
    await write(settings, topic, [[None] * 5] * 3)  # three separate batches of 5 records
    tp = TopicPartition(topic, 0)
    listed = (await ask(settings, lambda reader: reader.end_offsets([tp])))[tp]
    # Tansu's quirk: "base offset of the last batch + 1". If this ever equals 15, Tansu was fixed and
    # item 2 of the work-arounds can go.
    assert listed < 15
    corrected = await tansu_workarounds.true_end_offsets(settings.bootstrap_servers, {tp: listed})
    assert corrected[tp] == 15


async def test_offsets_for_times_ignores_the_time_and_the_scan_does_not(broker: EmbeddedBroker) -> None:
    settings = embedded(broker)
    topic = "workaround-offsets-for-times"
    await write(settings, topic, [[(1_000_000 + second) * 1000] for second in range(10)])  # record n: 1e6 + n s
    tp = TopicPartition(topic, 0)
    listed = (await ask(settings, lambda reader: reader.offsets_for_times({tp: 1_000_006 * 1000})))[tp]
    # Tansu's quirk: offset 0 for any time. If this ever says 6, item 5 of the work-arounds can go.
    assert listed is not None and listed.offset == 0
    scanned = await tansu_workarounds.offsets_for_times_by_scan(settings.bootstrap_servers, [tp], 1_000_006 * 1000)
    assert scanned == {tp: 6}
    late = await tansu_workarounds.offsets_for_times_by_scan(settings.bootstrap_servers, [tp], 2_000_000 * 1000)
    assert late == {tp: None}


async def test_worker_consumer_gets_short_fetch_wait_only_on_embedded_broker(broker: EmbeddedBroker) -> None:
    import faust

    tansu_workarounds.install(embedded(broker))
    app = faust.App("workaround-fetch-wait", **faust_config(embedded(broker)))
    thread = app.consumer._thread  # type: ignore[attr-defined]
    created = thread._create_worker_consumer(app.transport)
    assert created._fetch_max_wait_ms == tansu_workarounds.FETCH_MAX_WAIT_MS  # Faust hard-codes 1500


def test_short_session_timeout_only_for_the_embedded_broker(broker: EmbeddedBroker) -> None:
    config = faust_config(embedded(broker))
    assert config["broker_session_timeout"] == tansu_workarounds.SESSION_TIMEOUT_S
    real_kafka = faust_config(Settings(broker_url="kafka://kafka-1:9092;kafka-2:9092"))
    assert not {"broker_session_timeout", "broker_heartbeat_interval", "broker_rebalance_timeout"} & set(real_kafka)


def test_exactly_once_is_refused_on_the_embedded_broker_with_a_reason(broker: EmbeddedBroker) -> None:
    with pytest.raises(tansu_workarounds.EmbeddedBrokerUnsupported, match="InitProducerId"):
        faust_config(embedded(broker, processing_guarantee="exactly_once"))
    assert faust_config(Settings(processing_guarantee="exactly_once"))["processing_guarantee"] == "exactly_once"


async def test_the_embedded_broker_is_detected_from_its_metadata_answer(broker: EmbeddedBroker) -> None:
    told_nothing = Settings(broker_url=broker.url)
    assert await tansu_workarounds.cluster_id(told_nothing) == "tansu_cluster"
    assert (await tansu_workarounds.detect(told_nothing)).embedded_broker is True
    opted_out = Settings(broker_url=broker.url, embedded_broker_detect=False)
    assert (await tansu_workarounds.detect(opted_out)).embedded_broker is False
    # Apache Kafka reports a base64 UUID (KRaft) as its cluster id.
    assert not tansu_workarounds.is_tansu("MkU3OEVBNTcwNTJENDM2Qk") and not tansu_workarounds.is_tansu(None)
