"""Applying deltas to Redis effectively once on an at-least-once topic.

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

import sys
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

import orjson
from aiokafka.structs import TopicPartition

from stream_app.core.profile import Delta, ProfileState
from stream_app.core.replica import ProfileReplicas, apply_delta
from stream_app.kafka.reading import read_partition
from stream_app.ops.settings import Settings
from stream_app.serving.redis_store import ProfileStore

MAX_CAS_ATTEMPTS: Final = 20


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
    replicas = ProfileReplicas()
    records = read_partition(settings, TopicPartition(topic, partition), max(upto.values()), idle_timeout_s)
    async for record in records:
        if record.value is None:
            continue
        delta = orjson.loads(record.value)
        if record.offset <= upto.get(delta["user_id"], -1):
            replicas.apply(delta)
    return replicas


