"""The Redis sink against fakeredis: order, duplicates, gaps, restarts, two concurrent appliers, and faults
(malformed records, keys of another type, incomplete history, Redis outages, two delta topics)."""

from __future__ import annotations

import asyncio
import copy
import logging
import random
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import fakeredis
import orjson
import pytest
from aiokafka.structs import TopicPartition
from redis import exceptions as redis_exceptions

from schemas.events import Event
from stream_app.core.fold import fold_batch
from stream_app.core.profile import Delta, ProfileParams, ProfileState
from stream_app.core.replica import ProfileReplicas
from stream_app.ops.settings import Settings
from stream_app.serving import subscribe as subscribe_module
from stream_app.serving.deltas import MalformedDelta, parse_delta
from stream_app.serving.redis_sink import Backoff, DeltaSink, Item, SinkStats, write_with_retry
from stream_app.serving.redis_store import Loaded, ProfileStore, profile_key
from stream_app.serving.subscribe import SubscribeOptions, decode_batch

HOUR = 3600.0
TOPIC = "deltas"
USERS = ("u1", "u2", "u3", "u4")
PARAMS = ProfileParams(half_life_s=6 * HOUR, weights={"click": 1.0, "search": 2.0, "review": 3.0}, top_k=3)


def worker_deltas(n_events: int = 120, seed: int = 7) -> list[Delta]:
    """Deltas exactly as the worker publishes them, for events over ~70 half-lives (landmark moves)."""
    rng = random.Random(seed)
    table: dict[str, dict[str, Any]] = {}
    deltas: list[Delta] = []
    for i in range(0, n_events, 3):
        batch: list[Event] = []
        for j in range(i, i + 3):
            user = rng.choice(USERS)
            ts = j * 4 * 6 * HOUR * rng.uniform(0.9, 1.1)
            if j % 2:
                event = Event(f"e{j}", user, ts, "search", category=rng.choice("abcde"), query="red shoes hat")
            else:
                event = Event(f"e{j}", user, ts, "click", category=rng.choice("abcdef"), item_id="i")
            batch.append(event)
        folded = fold_batch(batch, table.get, PARAMS)  # the profile agent's own fold
        table.update(folded.writes)
        assert all(not again for _, again in folded.deltas)
        deltas.extend(copy.deepcopy(delta) for delta, _ in folded.deltas)
    return deltas


def partition_of(user: str) -> int:
    return USERS.index(user) % 2


def as_items(deltas: list[Delta]) -> list[Item]:
    """Deltas on a two-partition topic, keyed (so partitioned) by user, with their offsets."""
    offsets = [0, 0]
    items = []
    for delta in deltas:
        partition = partition_of(delta["user_id"])
        items.append(Item(TOPIC, partition, offsets[partition], delta))
        offsets[partition] += 1
    return items


class TopicHistory:
    """A `History` over an in-memory topic; records every resync it is asked for."""

    def __init__(self, items: list[Item]) -> None:
        self.items = items
        self.calls: list[tuple[int, dict[str, int]]] = []

    async def __call__(self, topic: str, partition: int, upto: dict[str, int]) -> ProfileReplicas:
        self.calls.append((partition, dict(upto)))
        replicas = ProfileReplicas()
        for item in self.items:
            if item.partition == partition and item.offset <= upto.get(item.delta["user_id"], -1):
                replicas.apply(copy.deepcopy(item.delta))
        return replicas


@pytest.fixture
def redis() -> Iterator[Any]:
    yield fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())


def expected_views(deltas: list[Delta], at: float | None = None) -> list[dict[str, Any]]:
    return list(ProfileReplicas().apply_all(copy.deepcopy(deltas)).views(at))


def batches(items: list[Item], sizes: list[int]) -> Iterator[list[Item]]:
    start = 0
    for size in sizes * len(items):
        if start >= len(items):
            return
        yield [copy.deepcopy(item) for item in items[start:start + size]]
        start += size


async def test_deltas_applied_in_order_give_the_replicas_bit_for_bit(redis: Any) -> None:
    deltas = worker_deltas()
    items = as_items(deltas)
    store = ProfileStore(redis, TOPIC)
    sink = DeltaSink(store, TopicHistory(items))
    for batch in batches(items, [1, 5, 2, 17]):
        await sink.write(batch)

    assert await store.views() == expected_views(deltas)
    late = max(d["as_of"] for d in deltas) + 3 * HOUR
    assert await store.views(at=late) == expected_views(deltas, late)
    assert await store.views(["u2", "nobody"]) == [v for v in expected_views(deltas) if v["user_id"] == "u2"]
    assert sink.stats.applied == len(deltas) and sink.stats.skipped == 0 and sink.stats.resynced == 0
    for user in USERS:
        stored = await redis.hgetall(profile_key(TOPIC, user))
        last = max(d["version"] for d in deltas if d["user_id"] == user)
        assert int(stored[b"version"]) == orjson.loads(stored[b"state"])["version"] == last


async def test_old_and_duplicate_versions_are_skipped(redis: Any) -> None:
    deltas = worker_deltas()
    items = as_items(deltas)
    store = ProfileStore(redis, TOPIC)
    sink = DeltaSink(store, TopicHistory(items))
    await sink.write(items)
    before = await store.views()

    # Redelivered as a whole, and re-emitted out of order within one batch (old versions after new).
    await sink.write(copy.deepcopy(items))
    shuffled = copy.deepcopy(items)
    random.Random(1).shuffle(shuffled)
    await sink.write(shuffled)

    assert await store.views() == before == expected_views(deltas)
    assert sink.stats.applied == len(deltas)
    assert sink.stats.skipped == 2 * len(deltas)
    assert sink.stats.resynced == 0


async def test_a_gap_rebuilds_the_user_from_the_topic(redis: Any) -> None:
    deltas = worker_deltas()
    items = as_items(deltas)
    history = TopicHistory(items)
    store = ProfileStore(redis, TOPIC)
    sink = DeltaSink(store, history)
    u1 = [item for item in items if item.delta["user_id"] == "u1"]
    assert len(u1) >= 6
    others = [item for item in items if item.delta["user_id"] != "u1"]

    await sink.write(u1[:2] + others)
    await sink.write(u1[4:5])  # versions 3 and 4 were never delivered
    assert history.calls == [(partition_of("u1"), {"u1": u1[4].offset})]
    assert sink.stats.resynced == 1
    assert (await store.get("u1")) is not None
    assert (await store.views(["u1"])) == expected_views([i.delta for i in u1[:5]])

    # Redis lost a key: the next delta of that user is a gap too, and the rebuild covers it.
    await redis.delete(profile_key(TOPIC, "u1"))
    await sink.write(u1[5:])
    assert len(history.calls) == 2 and history.calls[1] == (partition_of("u1"), {"u1": u1[-1].offset})
    assert await store.views() == expected_views(deltas)
    assert sink.stats.resynced == 2 and sink.stats.unrepaired == 0


async def test_a_gap_the_topic_cannot_fill_is_reported_and_applied_anyway(redis: Any) -> None:
    deltas = [d for d in worker_deltas() if d["user_id"] == "u3"]
    retained = as_items(deltas)[3:]  # retention removed the first three deltas
    sink = DeltaSink(ProfileStore(redis, TOPIC), TopicHistory(retained))
    await sink.write(retained[-1:])
    assert sink.stats.resynced == 1 and sink.stats.unrepaired == 1
    [view] = await ProfileStore(redis, TOPIC).views()
    assert view["version"] == deltas[-1]["version"]


async def test_a_restart_continues_from_the_stored_versions(redis: Any) -> None:
    deltas = worker_deltas()
    items = as_items(deltas)
    half = len(items) // 2
    first = DeltaSink(ProfileStore(redis, TOPIC), TopicHistory(items))
    await first.write(items[:half])

    # The restarted subscriber's committed offset is older than what Redis has (killed before the commit):
    # it gets everything again from the beginning.
    restarted = DeltaSink(ProfileStore(redis, TOPIC), TopicHistory(items))
    for batch in batches(items, [7]):
        await restarted.write(batch)
    assert restarted.stats.skipped == half
    assert restarted.stats.applied == len(items) - half
    assert restarted.stats.resynced == 0
    assert await restarted.store.views() == expected_views(deltas)


class RacingStore(ProfileStore):
    """Lets another subscriber write between this one's read and its compare-and-set, once."""

    def __init__(self, client: Any, other: DeltaSink, other_items: list[Item]) -> None:
        super().__init__(client, TOPIC)
        self.other, self.other_items = other, other_items
        self.raced = False

    async def load_checked(self, user_ids: Any) -> Loaded:
        loaded = await super().load_checked(user_ids)
        if not self.raced:
            self.raced = True
            await self.other.write(self.other_items)
        return loaded


async def test_compare_and_set_stops_two_appliers_from_overwriting_each_other(redis: Any) -> None:
    deltas = [d for d in worker_deltas() if d["user_id"] == "u2"]
    items = as_items(deltas)
    assert len(items) >= 6
    first = DeltaSink(ProfileStore(redis, TOPIC), TopicHistory(items))
    await first.write(items[:2])

    # B applies versions 3..5 while A, which read version 2, is applying 3.
    other = DeltaSink(ProfileStore(redis, TOPIC), TopicHistory(items))
    racing = DeltaSink(RacingStore(redis, other, copy.deepcopy(items[2:5])), TopicHistory(items))
    await racing.write(copy.deepcopy(items[2:3]))

    assert racing.stats.conflicts == 1  # its write of version 3 was refused ...
    assert racing.stats.skipped == 1 and racing.stats.applied == 0  # ... and on retry version 3 is old
    assert (await racing.store.views()) == expected_views(deltas[:5])  # not set back to version 3

    await racing.write(copy.deepcopy(items[5:]))
    assert (await racing.store.views()) == expected_views(deltas)


async def test_compare_and_set_refuses_a_stale_expected_version(redis: Any) -> None:
    store = ProfileStore(redis, TOPIC)
    state = ProfileState("u9", version=4, landmark=0.0, as_of=1.0, half_life_s=HOUR, activity={"click": 2.0})
    assert await store.compare_and_set({"u9": (0, state)}) == set()
    newer = ProfileState("u9", version=5, landmark=0.0, as_of=2.0, half_life_s=HOUR, activity={"click": 9.0})
    assert await store.compare_and_set({"u9": (3, newer)}) == {"u9"}
    stored = await store.get("u9")
    assert stored is not None and stored.version == 4 and stored.activity == {"click": 2.0}
    assert await store.compare_and_set({"u9": (4, newer)}) == set()
    assert int(await redis.hget(profile_key(TOPIC, "u9"), "version")) == 5


# -- faults ------------------------------------------------------------------------------------------


def record(value: bytes | None, offset: int, partition: int = 0) -> Any:
    return SimpleNamespace(topic=TOPIC, partition=partition, offset=offset, value=value)


MARKER = "payload-marker-7f3a"
MALFORMED = [
    b"not json " + MARKER.encode(),
    orjson.dumps([MARKER]),
    orjson.dumps({"user_id": MARKER, "as_of": 1.0, "landmark": 0.0, "half_life_s": 1.0, "activity": {}}),  # no version
    orjson.dumps({"user_id": MARKER, "version": "3", "as_of": 1.0, "landmark": 0.0, "half_life_s": 1.0}),
    orjson.dumps({"user_id": MARKER, "version": 2, "as_of": 1.0, "landmark": 0.0, "half_life_s": 1.0,
                  "activity": {"click": MARKER}}),
    orjson.dumps({"user_id": MARKER, "version": 2, "as_of": 1.0, "landmark": 0.0, "half_life_s": 1.0,
                  "embedding": {"num": [MARKER], "den": 1.0}}),
]


def test_malformed_delta_records_are_counted_logged_without_payload_and_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    deltas = worker_deltas()
    good = [record(orjson.dumps(d), i) for i, d in enumerate(deltas)]
    bad = [record(value, len(good) + i) for i, value in enumerate(MALFORMED)]
    stats = SinkStats()
    with caplog.at_level(logging.WARNING):
        items = decode_batch(good[:3] + bad + good[3:] + [record(None, 999)], stats)
    assert [item.delta for item in items] == deltas
    assert stats.malformed == len(MALFORMED) and stats.deltas == len(MALFORMED)
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == len(MALFORMED) and all("is not a delta" in line for line in logged)
    assert not [line for line in logged if MARKER in line]
    with pytest.raises(MalformedDelta, match="version"):
        parse_delta(MALFORMED[3])


async def test_a_key_of_another_type_is_skipped_and_counted_and_the_user_rebuilt_once_it_is_gone(
    redis: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    deltas = worker_deltas()
    items = as_items(deltas)
    store = ProfileStore(redis, TOPIC)
    sink = DeltaSink(store, TopicHistory(items))
    await redis.set(profile_key(TOPIC, "u2"), "someone else's string")
    u2 = [i for i in items if i.delta["user_id"] == "u2"]
    with caplog.at_level(logging.WARNING):
        await sink.write([i for i in items if i is not u2[-1]])
    assert await redis.get(profile_key(TOPIC, "u2")) == b"someone else's string"  # left as it was
    assert sink.stats.foreign == len(u2) - 1
    assert any("WRONGTYPE" in r.getMessage() and profile_key(TOPIC, "u2") in r.getMessage() for r in caplog.records)
    others = [d for d in deltas if d["user_id"] != "u2"]
    assert await store.views(["u1", "u3", "u4"]) == expected_views(others)

    # Removed by its owner: u2's next delta is a gap, and the user is rebuilt from the topic.
    await redis.delete(profile_key(TOPIC, "u2"))
    await sink.write([copy.deepcopy(u2[-1])])
    assert sink.stats.resynced == 1
    assert await store.views() == expected_views(deltas)


class TypeChangingStore(ProfileStore):
    """Someone writes a string at u1's key between this store's read and its compare-and-set."""

    async def load_checked(self, user_ids: Any) -> Loaded:
        loaded = await super().load_checked(user_ids)
        await self.client.set(self.key("u1"), "late writer")
        return loaded


async def test_wrongtype_at_write_time_is_skipped_too(redis: Any) -> None:
    items = [i for i in as_items(worker_deltas()) if i.delta["user_id"] in ("u1", "u3")]
    sink = DeltaSink(TypeChangingStore(redis, TOPIC), TopicHistory(items))
    await sink.write(items)
    assert sink.stats.foreign == len([i for i in items if i.delta["user_id"] == "u1"])
    assert await redis.get(profile_key(TOPIC, "u1")) == b"late writer"
    assert await ProfileStore(redis, TOPIC).views(["u3"]) == expected_views(
        [i.delta for i in items if i.delta["user_id"] == "u3"])


async def test_a_resync_without_the_first_deltas_keeps_the_complete_stored_profile(
    redis: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    deltas = [d for d in worker_deltas() if d["user_id"] == "u3"]
    items = as_items(deltas)
    assert len(items) >= 8
    store = ProfileStore(redis, TOPIC)
    await DeltaSink(store, TopicHistory(items)).write(items[:5])  # complete: versions 1..5
    complete = await store.views()

    retained = items[3:]  # retention removed versions 1..3; versions 6, 7 never reached this Redis
    sink = DeltaSink(store, TopicHistory(retained))
    with caplog.at_level(logging.WARNING):
        await sink.write(copy.deepcopy(items[7:8]))
    assert sink.stats.resynced == 1 and sink.stats.unrepaired == 1 and sink.stats.applied == 0
    assert await store.views() == complete == expected_views(deltas[:5])
    assert any("lost early deltas" in r.getMessage() and "kept" in r.getMessage() for r in caplog.records)


async def test_a_redis_outage_is_retried_with_bounded_backoff_until_written(redis: Any) -> None:
    server = redis.connection_pool.connection_kwargs["server"]
    deltas = worker_deltas()
    items = as_items(deltas)
    sink = DeltaSink(ProfileStore(redis, TOPIC), TopicHistory(items))
    waits: list[float] = []

    async def sleep(delay: float) -> None:
        waits.append(delay)
        if len(waits) == 4:
            server.connected = True  # Redis is back

    server.connected = False
    assert await write_with_retry(sink, items, Backoff(initial_s=0.1, max_s=0.5), asyncio.Event(), sleep)
    assert waits == [0.1, 0.2, 0.4, 0.5]
    assert sink.stats.reconnects == 4
    assert sink.stats.applied == len(deltas) and sink.stats.deltas == len(deltas)  # counted once
    assert await sink.store.views() == expected_views(deltas)


async def test_a_stop_during_an_outage_writes_and_reports_nothing(redis: Any) -> None:
    server = redis.connection_pool.connection_kwargs["server"]
    items = as_items(worker_deltas())
    sink = DeltaSink(ProfileStore(redis, TOPIC), TopicHistory(items))
    stop = asyncio.Event()

    async def sleep(delay: float) -> None:
        stop.set()

    server.connected = False
    assert not await write_with_retry(sink, items, Backoff(), stop, sleep)
    server.connected = True
    assert sink.stats.applied == 0 and sink.stats.deltas == 0 and await redis.keys("*") == []


async def test_a_wrong_password_is_raised_not_retried() -> None:
    class Refusing(DeltaSink):
        async def write(self, items: Any) -> None:
            raise redis_exceptions.AuthenticationError("invalid password")

    sink = Refusing(ProfileStore(fakeredis.FakeAsyncRedis(), TOPIC), TopicHistory([]))
    with pytest.raises(redis_exceptions.AuthenticationError):
        await write_with_retry(sink, [], Backoff(), asyncio.Event(), lambda delay: asyncio.sleep(0))
    assert sink.stats.reconnects == 0


def test_two_delta_topics_never_share_a_key() -> None:
    assert profile_key("profile-deltas", "u1") == "profile:profile-deltas:u1"
    assert profile_key("profile-deltas", "u1") != profile_key("profile-deltas-replay-x", "u1")
    with pytest.raises(ValueError, match="not a Kafka topic"):
        profile_key("a:b", "u1")


async def test_a_replay_topic_and_the_live_topic_in_one_redis_do_not_mix(redis: Any) -> None:
    live = worker_deltas(seed=7)
    replay = worker_deltas(n_events=60, seed=8)
    live_store, replay_store = ProfileStore(redis, "profile-deltas"), ProfileStore(redis, "profile-deltas-replay-r")
    await DeltaSink(live_store, TopicHistory([])).write(as_items(live))
    replay_sink = DeltaSink(replay_store, TopicHistory([]))
    await replay_sink.write(as_items(replay))
    assert replay_sink.stats.skipped == 0 and replay_sink.stats.applied == len(replay)
    assert await live_store.views() == expected_views(live)
    assert await replay_store.views() == expected_views(replay)


class FakeConsumer:
    """The part of AIOKafkaConsumer `subscribe` uses: fixed batches, commits recorded with the Redis state."""

    def __init__(self, batches: list[dict[Any, list[Any]]], on_fetch: Any) -> None:
        self.batches, self.on_fetch = batches, on_fetch
        self.commits: list[tuple[dict[Any, int], int]] = []
        self.fetches = 0
        self.sink_stats: SinkStats | None = None

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def subscribe(self, topics: list[str]) -> None: ...
    def assignment(self) -> set[Any]:
        return set()

    async def committed(self, tp: Any) -> int | None:
        return None

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[Any, list[Any]]:
        self.fetches += 1
        self.on_fetch(self.fetches)
        return self.batches.pop(0) if self.batches else {}

    async def commit(self, offsets: dict[Any, Any]) -> None:
        assert self.sink_stats is not None
        self.commits.append(({tp: o.offset for tp, o in offsets.items()}, self.sink_stats.applied))


async def test_offsets_of_deltas_not_in_redis_are_never_committed(redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    server = redis.connection_pool.connection_kwargs["server"]
    deltas = [d for d in worker_deltas() if d["user_id"] == "u1"][:6]
    tp = TopicPartition(TOPIC, 0)
    first = {tp: [record(orjson.dumps(d), i) for i, d in enumerate(deltas[:3])]}
    second = {tp: [record(orjson.dumps(d), 3 + i) for i, d in enumerate(deltas[3:])] + [record(b"junk", 6)]}
    stop = asyncio.Event()
    stats = SinkStats()

    def on_fetch(n: int) -> None:
        if n == 2:
            server.connected = False  # Redis goes away with the second batch in hand
        if n == 3:
            stop.set()

    fake = FakeConsumer([first, second], on_fetch)
    fake.sink_stats = stats
    monkeypatch.setattr(subscribe_module, "consumer", lambda *args, **kwargs: fake)

    async def reconnect_later() -> None:
        while stats.reconnects < 3:
            await asyncio.sleep(0.01)
        server.connected = True

    options = SubscribeOptions(topic=TOPIC, group_id="g", backoff=Backoff(initial_s=0.01, max_s=0.02))
    settings = Settings()
    _, result = await asyncio.gather(reconnect_later(), subscribe_module.subscribe(
        settings, ProfileStore(redis, TOPIC), options, stop, report=lambda line: None, stats=stats))
    # Each commit came after its batch was in Redis; the junk record's offset is committed with its batch.
    assert fake.commits == [({tp: 3}, 3), ({tp: 7}, 6)]
    assert result.reconnects >= 3 and result.malformed == 1
    assert await ProfileStore(redis, TOPIC).views() == expected_views(deltas)

    # Redis down and the subscriber stopped before it came back: that batch is not committed.
    server.connected = False
    stop = asyncio.Event()
    fake = FakeConsumer([{tp: [record(orjson.dumps(deltas[0]), 0)]}], lambda n: None)
    fake.sink_stats = stats
    monkeypatch.setattr(subscribe_module, "consumer", lambda *args, **kwargs: fake)

    failures_before = stats.reconnects

    async def stop_after_two_failures() -> None:
        while stats.reconnects < failures_before + 2:
            await asyncio.sleep(0.01)
        stop.set()

    await asyncio.gather(stop_after_two_failures(), subscribe_module.subscribe(
        settings, ProfileStore(redis, TOPIC), options, stop, report=lambda line: None, stats=stats))
    assert fake.commits == []
