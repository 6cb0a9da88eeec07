"""`stream-app subscribe`: materialise the delta topic into Redis, one hash per user, effectively once.

Layout: key `profile:{user_id}` (the id as it is on the delta topic: a pseudonym when
PROFILE_PSEUDONYM_KEY is set) is a hash with two fields:

* `version`: the last delta version applied, a decimal integer;
* `state`: JSON of the subscriber's `ProfileState` (stored forward-decayed sums, landmark, half-life,
  `as_of` and `version` again), exactly what `stream_app.subscriber.apply_delta` works on.

A hash and not one JSON string, because the compare-and-set script then checks an integer field in O(1)
instead of parsing a profile (hundreds of floats with an embedding) inside Redis on every write; and the
state is one JSON document, not one field per key, because it is nested and always read and written whole.
JSON floats round-trip exactly (orjson writes the shortest repr), so Redis holds bit for bit what
`ProfileReplicas` would.

Effectively once on an at-least-once topic:

* Deltas of a user are applied in version order by `apply_delta`: a version <= the stored one is skipped
  (a redelivery), stored + 1 is applied.
* Every write is a compare-and-set on the version it was computed from (a Lua script), so a second
  subscriber, or a restarted one that re-reads deltas, can never write a state on top of another one; the
  loser reloads and retries (its deltas are then mostly skipped).
* Kafka offsets are committed only after the Redis writes of a batch, so a kill -9 loses nothing: the
  deltas after the last commit come again and are skipped or applied by version.
* A gap (version > stored + 1: Redis lost data, a key was deleted, or a new group started at `latest`)
  makes the subscriber rebuild that user from the start of the delta topic's partition (the user's deltas
  all share one partition, the key being the user id) up to the current delta, and write the result.
  Cost: one read of that partition from its beginning per batch that has gaps, shared by all the batch's
  gap users of that partition. After losing the whole of Redis, start a new consumer group instead
  (`--group`): it rebuilds everything in one pass without gaps.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import orjson

from stream_app.profile import Delta, ProfileState
from stream_app.settings import Settings
from stream_app.subscriber import ProfileReplicas, apply_delta

KEY_PREFIX: Final = "profile:"
MAX_CAS_ATTEMPTS: Final = 20

# KEYS[1]: profile key; ARGV: expected stored version, new version, new state JSON.
# Returns -1 when written, otherwise the version that is stored (someone else wrote first).
CAS_SCRIPT: Final = """
local stored = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if stored ~= tonumber(ARGV[1]) then
  return stored
end
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'state', ARGV[3])
return -1
"""


def profile_key(user_id: str) -> str:
    return f"{KEY_PREFIX}{user_id}"


def encode_state(state: ProfileState) -> bytes:
    doc = state.to_dict()
    del doc["seen"], doc["outbox"]  # worker-only bookkeeping, always empty in a replica
    return orjson.dumps(doc)


def decode_state(raw: bytes | str) -> ProfileState:
    return ProfileState.from_dict(orjson.loads(raw))


class ProfileStore:
    """The Redis side: load states, compare-and-set them, read them back (redis.asyncio client)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._cas = client.register_script(CAS_SCRIPT)

    async def load(self, user_ids: Sequence[str]) -> dict[str, ProfileState]:
        if not user_ids:
            return {}
        async with self.client.pipeline(transaction=False) as pipe:
            for user_id in user_ids:
                pipe.hget(profile_key(user_id), "state")
            raws = await pipe.execute()
        return {u: decode_state(raw) for u, raw in zip(user_ids, raws, strict=True) if raw is not None}

    async def get(self, user_id: str) -> ProfileState | None:
        return (await self.load([user_id])).get(user_id)

    async def compare_and_set(self, writes: dict[str, tuple[int, ProfileState]]) -> set[str]:
        """Write each user's state if its stored version is still the expected one; the users that lost."""
        if not writes:
            return set()
        async with self.client.pipeline(transaction=False) as pipe:
            for user_id, (expected, state) in writes.items():
                await self._cas(keys=[profile_key(user_id)], args=[expected, state.version, encode_state(state)],
                                client=pipe)
            results = await pipe.execute()
        return {user_id for user_id, result in zip(writes, results, strict=True) if int(result) != -1}

    async def user_ids(self) -> list[str]:
        found = [key.decode() if isinstance(key, bytes) else key
                 async for key in self.client.scan_iter(match=f"{KEY_PREFIX}*", count=1000)]
        return sorted(key[len(KEY_PREFIX):] for key in found)

    async def views(self, user_ids: Sequence[str] | None = None, at: float | None = None) -> list[dict[str, Any]]:
        """Profiles as `stream-app snapshot` prints them (sorted by user id; unknown users left out)."""
        wanted = await self.user_ids() if user_ids is None else sorted(user_ids)
        states = await self.load(wanted)
        return [states[u].view(at) for u in wanted if u in states]


@dataclass(frozen=True, slots=True)
class Item:
    """One delta as read from the topic, with where it was (for resyncs and offset commits)."""

    topic: str
    partition: int
    offset: int
    delta: Delta


class History(Protocol):
    """Rebuilds users from the delta topic: {user: last offset to include} of one partition -> replicas."""

    def __call__(self, topic: str, partition: int, upto: dict[str, int]) -> Awaitable[ProfileReplicas]: ...


@dataclass
class SinkStats:
    deltas: int = 0
    applied: int = 0
    skipped: int = 0  # duplicates: version not newer than Redis'
    resynced: int = 0  # users rebuilt from the topic after a gap
    unrepaired: int = 0  # resynced users whose history itself has gaps (e.g. retention removed deltas)
    conflicts: int = 0  # compare-and-set lost to another writer, retried

    def line(self) -> str:
        return (f"{self.deltas} deltas: {self.applied} applied, {self.skipped} skipped, "
                f"{self.resynced} resynced, {self.conflicts} conflicts")


@dataclass
class _Outcome:
    state: ProfileState
    expected: int
    applied: int = 0
    skipped: int = 0
    gap: bool = False
    unrepaired: bool = False


@dataclass
class DeltaSink:
    store: ProfileStore
    history: History
    stats: SinkStats = field(default_factory=SinkStats)

    async def write(self, items: Sequence[Item]) -> None:
        """Apply a batch of deltas to Redis; returns once every one of them is reflected there."""
        by_user: dict[str, list[Item]] = {}
        for item in items:
            by_user.setdefault(item.delta["user_id"], []).append(item)
        pending = list(by_user)
        for _ in range(MAX_CAS_ATTEMPTS):
            stored = await self.store.load(pending)
            outcomes = {u: _fold(stored.get(u), u, by_user[u]) for u in pending}
            await self._resync([u for u, o in outcomes.items() if o.gap], by_user, outcomes)
            writes = {u: (o.expected, o.state) for u, o in outcomes.items() if o.state.version > o.expected}
            lost = await self.store.compare_and_set(writes)
            for user, outcome in outcomes.items():
                if user not in lost:
                    self.stats.applied += outcome.applied
                    self.stats.skipped += outcome.skipped
                    self.stats.resynced += outcome.gap
                    self.stats.unrepaired += outcome.unrepaired
            self.stats.conflicts += len(lost)
            pending = sorted(lost)
            if not pending:
                self.stats.deltas += len(items)
                return
        raise RuntimeError(f"compare-and-set kept failing for {pending[:3]}: is something else writing them?")

    async def _resync(self, users: list[str], by_user: dict[str, list[Item]], outcomes: dict[str, _Outcome]) -> None:
        by_partition: dict[tuple[str, int], dict[str, int]] = {}
        for user in users:
            last = by_user[user][-1]
            by_partition.setdefault((last.topic, last.partition), {})[user] = last.offset
        for (topic, partition), upto in by_partition.items():
            replicas = await self.history(topic, partition, upto)
            for user in upto:
                outcome = outcomes[user]
                outcome.state = replicas.profiles.get(user, outcome.state)
                outcome.applied = 0
                outcome.skipped = 0
            for user in {gap_user for gap_user, _, _ in replicas.gaps}:
                outcomes[user].unrepaired = True
                print(f"warning: the delta topic has version gaps for {user!r} (retention?); its profile "
                      f"holds what the remaining deltas give", file=sys.stderr, flush=True)


def _fold(stored: ProfileState | None, user_id: str, items: Iterable[Item]) -> _Outcome:
    state = stored if stored is not None else ProfileState(user_id)
    outcome = _Outcome(state, state.version)
    for item in items:
        version = item.delta["version"]
        if version > state.version + 1:
            outcome.gap = True  # rebuilt from the topic instead, up to this batch's last delta of the user
            return outcome
        if apply_delta(state, item.delta):
            outcome.applied += 1
        else:
            outcome.skipped += 1
    return outcome


async def read_partition_history(settings: Settings, topic: str, partition: int, upto: dict[str, int],
                                 idle_timeout_s: float = 30.0) -> ProfileReplicas:
    """Replicas of `upto`'s users from the partition's first delta up to each user's given offset."""
    from aiokafka.structs import TopicPartition

    from stream_app.kafka_clients import consumer

    tp = TopicPartition(topic, partition)
    last = max(upto.values())
    replicas = ProfileReplicas()
    client = consumer(settings)
    await client.start()
    try:
        client.assign([tp])
        await client.seek_to_beginning(tp)
        deadline = time.monotonic() + idle_timeout_s
        while await client.position(tp) <= last:
            batch = await client.getmany(tp, timeout_ms=200)
            for record in batch.get(tp, []):
                deadline = time.monotonic() + idle_timeout_s
                if record.value is None:
                    continue
                delta = orjson.loads(record.value)
                if record.offset <= upto.get(delta["user_id"], -1):
                    replicas.apply(delta)
            if time.monotonic() > deadline:
                raise TimeoutError(f"resync of {topic}[{partition}]: no progress for {idle_timeout_s} s")
    finally:
        await client.stop()
    return replicas


# -- the consumer loop ---------------------------------------------------------------------------------

def group_id_for(settings: Settings) -> str:
    return f"{settings.app_id}-redis-sink"


def redis_client(settings: Settings, url: str | None = None) -> Any:
    import redis.asyncio

    password = settings.redis_password.get_secret_value() if settings.redis_password is not None else None
    return redis.asyncio.from_url(url or settings.redis_url, password=password)


@dataclass
class SubscribeOptions:
    topic: str
    group_id: str
    until_caught_up: bool = False
    max_records: int = 2000
    progress_every_s: float = 5.0
    caught_up_timeout_s: float = 600.0


async def subscribe(settings: Settings, store: ProfileStore, options: SubscribeOptions,
                    stop: asyncio.Event | None = None, report: Callable[[str], None] = print) -> SinkStats:
    """Consume the delta topic into `store` until `stop` is set (or, with until_caught_up, until the group
    has committed everything the topic held when this started)."""
    from aiokafka.errors import CommitFailedError, IllegalStateError
    from aiokafka.structs import OffsetAndMetadata, TopicPartition

    from stream_app.kafka_clients import consumer
    from stream_app.replay import end_offsets

    stop = stop or asyncio.Event()
    history_settings = settings.model_copy(update={"topic_deltas": options.topic})

    async def history(topic: str, partition: int, upto: dict[str, int]) -> ProfileReplicas:
        return await read_partition_history(history_settings, topic, partition, upto)

    sink = DeltaSink(store, history)
    targets: dict[TopicPartition, int] = {}
    if options.until_caught_up:
        targets = {tp: end for tp, end in (await end_offsets(settings, [options.topic])).items() if end > 0}
    client = consumer(settings, group_id=options.group_id, auto_offset_reset="earliest",
                      max_poll_records=options.max_records, **_group_timeouts(settings))
    await client.start()
    committed: dict[TopicPartition, int] = {}
    try:
        client.subscribe([options.topic])
        report(f"subscribe: {options.topic} -> Redis, consumer group {options.group_id}")
        committed = await _committed(client, targets)
        started = last_report = time.monotonic()
        while not stop.is_set():
            if options.until_caught_up and all(committed.get(tp, 0) >= end for tp, end in targets.items()):
                break
            batch = await client.getmany(timeout_ms=500, max_records=options.max_records)
            items = [Item(r.topic, r.partition, r.offset, orjson.loads(r.value))
                     for records in batch.values() for r in records if r.value is not None]
            await sink.write(items)  # Redis first ...
            offsets = {tp: records[-1].offset + 1 for tp, records in batch.items() if records}
            if offsets:
                try:  # ... then Kafka: a crash in between means redelivery, which the versions absorb.
                    await client.commit({tp: OffsetAndMetadata(o, "") for tp, o in offsets.items()})
                    committed.update(offsets)
                except (CommitFailedError, IllegalStateError) as error:
                    report(f"subscribe: commit failed ({error}); a rebalance moves these deltas, which is harmless")
            elif options.until_caught_up:
                # Idle: partitions of other group members count when the group has committed them.
                committed.update(await _committed(client, targets))
            now = time.monotonic()
            if now - last_report >= options.progress_every_s:
                last_report = now
                committed.update(await _committed(client, set(client.assignment()) - set(committed)))
                report(f"subscribe: {sink.stats.line()}, lag {_lag(client, committed)}")
            if options.until_caught_up and now - started > options.caught_up_timeout_s:
                raise TimeoutError(f"not caught up after {options.caught_up_timeout_s} s: {sink.stats.line()}")
    finally:
        await client.stop()
    report(f"subscribe: {'caught up' if options.until_caught_up else 'stopped'}; {sink.stats.line()}")
    return sink.stats


def _group_timeouts(settings: Settings) -> dict[str, Any]:
    if not settings.embedded_broker:
        return {}
    from stream_app.tansu_workarounds import HEARTBEAT_INTERVAL_S, SESSION_TIMEOUT_S

    # tansu_workarounds item 1: joins and a killed subscriber's eviction take ~session timeout on Tansu.
    return {"session_timeout_ms": int(SESSION_TIMEOUT_S * 1000),
            "heartbeat_interval_ms": int(HEARTBEAT_INTERVAL_S * 1000)}


async def _committed(client: Any, tps: Iterable[Any]) -> dict[Any, int]:
    return {tp: offset for tp in tps if (offset := await client.committed(tp)) is not None}


def _lag(client: Any, committed: dict[Any, int]) -> int | str:
    """Deltas not yet in Redis on our partitions ('?' until every partition has been fetched once)."""
    highs = {tp: client.highwater(tp) for tp in client.assignment()}
    if any(high is None for high in highs.values()):
        return "?"
    return sum(max(0, high - committed.get(tp, 0)) for tp, high in highs.items())


def run_subscriber(settings: Settings, options: SubscribeOptions, redis_url: str | None = None) -> SinkStats:
    """Blocking entry point for the CLI: stops on SIGTERM/SIGINT after finishing the current batch."""

    async def main() -> SinkStats:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        client = redis_client(settings, redis_url)
        try:
            await client.ping()
            return await subscribe(settings, ProfileStore(client), options, stop,
                                   report=lambda line: print(line, flush=True))
        finally:
            await client.aclose()

    return asyncio.run(main())


async def read_views(settings: Settings, user_ids: Sequence[str] | None, at: float | None,
                     redis_url: str | None = None) -> list[dict[str, Any]]:
    client = redis_client(settings, redis_url)
    try:
        return await ProfileStore(client).views(user_ids, at)
    finally:
        await client.aclose()
