"""Per-record shortcuts give what the code they replace gives: the raw topics' decoding
(stream_app/worker/topics.py), the end-offset gauge and the batch-observed delta-lag histogram
(stream_app/ops/metrics.py), the topic -> event type lookup of triage (stream_app/ops/settings.py)."""

from __future__ import annotations

import faust
import pytest
from faust.transport.consumer import ConsumerMessage
from faust.types import TP
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from stream_app.ops import metrics
from stream_app.ops.settings import Settings
from stream_app.worker.topics import RawBytes

TOPIC = TP("clicks", 3)


def message(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> ConsumerMessage:
    return ConsumerMessage(TOPIC.topic, TOPIC.partition, 17, 1.5, 0, headers, key, value, None,
                           0 if key is None else len(key), 0 if value is None else len(value), TOPIC)


@pytest.mark.parametrize(("key", "value", "headers"), [
    (b"user-1", b'{"type": "click"}', []),
    (None, b"\xff\xfe not utf-8", [("trace", b"1")]),
    (b"user-1", None, []),  # a tombstone stays a null value
    (None, None, []),
    (b"", b"", []),
])
async def test_raw_topics_decode_exactly_as_fausts_raw_codec(key: bytes | None, value: bytes | None,
                                                             headers: list[tuple[str, bytes]]) -> None:
    app = faust.App("raw-decoding", broker="kafka://127.0.0.1:1", store="memory://")
    fausts = app.topic("clicks", key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    ours = app.topic("clicks", schema=RawBytes())
    record = message(key, value, headers)
    expected, got = await fausts.decode(record), await ours.decode(record)
    assert type(got) is type(expected)
    assert (got.key, got.value, got.headers, got.message) == (expected.key, expected.value, expected.headers, record)
    assert ours.key_type is bytes and ours.value_type is bytes  # what Faust reads when it sends to the topic


async def test_raw_topics_still_send_bytes_unchanged() -> None:
    app = faust.App("raw-sending", broker="kafka://127.0.0.1:1", store="memory://")
    ours = app.topic("clicks", schema=RawBytes())
    key, _ = ours.prepare_key(b"user-1", None)
    value, _ = ours.prepare_value(b"\xff raw", None)
    assert (key, value) == (b"user-1", b"\xff raw")


def test_end_offsets_reach_the_gauge_and_faust_s_monitor() -> None:
    from faust.sensors.prometheus import setup_prometheus_sensors

    registry = CollectorRegistry()  # of its own: the worker's gauge names are global
    app = faust.App("end-offsets", broker="kafka://127.0.0.1:1", store="memory://")
    setup_prometheus_sensors(app, name_prefix="faust", registry=registry)
    metrics.remember_end_offset_gauges(app)
    other = TP("searches", 0)
    for tp, offset in ((TOPIC, 10), (other, 4), (TOPIC, 12)):
        app.monitor.track_tp_end_offset(tp, offset)
    assert app.monitor.tp_end_offsets == {TOPIC: 12, other: 4}
    gauge = "faust_topic_partition_end_offset"
    assert registry.get_sample_value(gauge, {"topic": "clicks", "partition": "3"}) == 12
    assert registry.get_sample_value(gauge, {"topic": "searches", "partition": "0"}) == 4


def test_a_batch_histogram_exposes_what_prometheus_clients_histogram_exposes_for_the_same_values() -> None:
    registry = CollectorRegistry()
    buckets = (0.01, 0.05, 1, 3600)
    reference = Histogram("lag_seconds", "lag", buckets=buckets, registry=registry)
    ours = metrics.BatchHistogram("lag_seconds", "lag", buckets, registry=None)
    # On a bound (counted in that bucket, <=), just over one, 0, past the last bound, in two batches.
    values = [[0.0, 0.01, 0.010000001, 0.05, 0.5], [], [1.0, 3600.0, 3600.5, 1e12]]
    for batch in values:
        for value in batch:
            reference.observe(value)
        ours.observe_many(iter(batch))
    mine = CollectorRegistry()
    mine.register(ours)

    def histogram_lines(exposition: bytes) -> list[str]:
        return [line for line in exposition.decode().splitlines() if "_created" not in line]

    assert histogram_lines(generate_latest(mine)) == histogram_lines(generate_latest(registry))
    assert mine.get_sample_value("lag_seconds_bucket", {"le": "0.01"}) == 2
    assert mine.get_sample_value("lag_seconds_count") == 9


@pytest.mark.parametrize("topics", [{}, {"topic_clicks": "c", "topic_searches": "s", "topic_reviews": "r"},
                                    {"topic_clicks": "same", "topic_searches": "same"}])
def test_the_event_type_of_a_topic_inverts_the_input_topic_map(topics: dict[str, str]) -> None:
    settings = Settings(**topics)
    inverted: dict[str, str] = {}
    for event_type, topic in settings.input_topics.items():
        inverted.setdefault(topic, event_type)  # the first type of a shared name, as the map's order gives
    for topic, event_type in inverted.items():
        assert settings.event_type_of_topic(topic) == event_type
    assert settings.event_type_of_topic("orders") is None
