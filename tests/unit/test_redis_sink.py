"""The Redis sink against fakeredis: order, duplicates, gaps, restarts and two concurrent appliers."""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from typing import Any

import fakeredis
import orjson
import pytest

from schemas.events import Event
from stream_app.core.fold import fold_batch
from stream_app.core.profile import Delta, ProfileParams, ProfileState
from stream_app.core.replica import ProfileReplicas
from stream_app.serving.redis_sink import DeltaSink, Item
from stream_app.serving.redis_store import Loaded, ProfileStore, profile_key

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
