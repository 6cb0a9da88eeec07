import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import Event, event_from_trusted_doc
from stream_app.core.fold import encode_bundle
from stream_app.kafka import partitioning
from stream_app.kafka.partitioning import KeyPartitioner, partition_for_user
from stream_app.worker.publish import bundle_by_partition


def test_bundle_partition_is_the_one_aiokafka_picks_for_the_key() -> None:
    # The table changelog is partitioned by aiokafka's partitioner; bundles must land on the same partition.
    partitioner = DefaultPartitioner()
    partitions = list(range(7))
    for user in ["u1", "cdnow-00042", "ünïcode", "x" * 300]:
        assert partition_for_user(user, 7) == partitioner(user.encode(), partitions, partitions)


def test_bundles_group_by_partition_and_round_trip() -> None:
    import orjson

    events = [Event(f"e{i}", f"u{i % 5}", float(i), "click", item_id="i") for i in range(20)]
    bundles = bundle_by_partition(events, 3)
    assert sorted(e.event_id for b in bundles.values() for e in b) == sorted(e.event_id for e in events)
    for partition, bundle in bundles.items():
        assert {partition_for_user(e.user_id, 3) for e in bundle} == {partition}
        assert [event_from_trusted_doc(d) for d in orjson.loads(encode_bundle(bundle))] == bundle


@settings(max_examples=500, deadline=None)
@given(key=st.binary(max_size=300))
def test_our_murmur2_is_the_java_clients_as_aiokafka_computes_it(key: bytes) -> None:
    assert partitioning.murmur2(key) == aiokafka_murmur2(key)


def test_our_murmur2_covers_every_tail_length() -> None:
    for length in range(64):
        key = bytes(range(200, 200 - length, -1)) if length else b""  # high bytes: no sign slips
        assert partitioning.murmur2(key) == aiokafka_murmur2(key)


@settings(max_examples=300, deadline=None)
@given(keys=st.lists(st.binary(max_size=80), min_size=1, max_size=20), count=st.integers(1, 64))
def test_the_remembering_partitioner_picks_the_default_partitioners_partition(keys: list[bytes], count: int) -> None:
    partitions = list(range(count))
    ours = KeyPartitioner()
    for key in keys + keys:  # the second time from memory
        assert ours(key, partitions, partitions) == DefaultPartitioner()(key, partitions, partitions)
    assert ours(None, partitions, partitions) in partitions


def test_the_remembered_hashes_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(partitioning, "_MAX_REMEMBERED", 10)
    monkeypatch.setattr(partitioning, "_hashes", {})  # other tests' keys (user-0, ...) would already be there
    for index in range(25):
        user = f"user-{index}"
        assert partition_for_user(user, 7) == DefaultPartitioner()(user.encode(), list(range(7)), [])
    assert len(partitioning._hashes) <= 10
