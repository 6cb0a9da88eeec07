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
* A resync whose history is incomplete (retention removed the user's first deltas: the rebuilt history
  starts at a version > 1, or has a hole) never overwrites a stored profile: a complete profile that is a
  few versions old is worth more than a current one that lacks the user's early activity. It is kept,
  counted as `unrepaired` and logged. With nothing stored, what the topic still holds is written (what
  `stream-app snapshot` shows too), also counted and logged.
* A user whose key holds something that is not our profile (WRONGTYPE, or a hash that is not our JSON) is
  counted as `foreign`, logged and skipped in that batch; the key is left to whoever wrote it. Once it is
  deleted, the user's next delta is a gap and the user is rebuilt.
* Redis errors (connection refused or reset, timeouts) fail the whole batch; `write_with_retry` retries it
  after an exponentially growing, bounded wait, and the caller commits offsets only after it returned True.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Final, Protocol

from aiokafka.structs import TopicPartition

from stream_app.core.profile import Delta, ProfileState
from stream_app.core.replica import ProfileReplicas, apply_delta
from stream_app.kafka.reading import read_partition
from stream_app.ops.settings import Settings
from stream_app.serving.deltas import MalformedDelta, parse_delta
from stream_app.serving.redis_store import ProfileStore

MAX_CAS_ATTEMPTS: Final = 20
log = logging.getLogger(__name__)


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
    """Counters of one subscriber since it started (also served as Prometheus counters, `sink_metrics`)."""

    deltas: int = 0
    applied: int = 0
    skipped: int = 0  # duplicates: version not newer than Redis'
    resynced: int = 0  # users rebuilt from the topic after a gap
    unrepaired: int = 0  # resyncs whose history itself has gaps (retention removed deltas): kept or partial
    conflicts: int = 0  # compare-and-set lost to another writer, retried
    malformed: int = 0  # records of the delta topic that are not an applicable delta: skipped
    foreign: int = 0  # deltas of users whose Redis key holds something else (WRONGTYPE): skipped
    reconnects: int = 0  # batches retried after a Redis connection error or timeout

    def line(self) -> str:
        return (f"{self.deltas} deltas: {self.applied} applied, {self.skipped} skipped, "
                f"{self.resynced} resynced, {self.conflicts} conflicts, {self.malformed} malformed, "
                f"{self.foreign} foreign, {self.unrepaired} unrepaired, {self.reconnects} reconnects")

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class _Outcome:
    state: ProfileState
    expected: int
    applied: int = 0
    skipped: int = 0
    gap: bool = False
    unrepaired: bool = False
    foreign: bool = False


@dataclass
class DeltaSink:
    store: ProfileStore
    history: History
    stats: SinkStats = field(default_factory=SinkStats)

    async def write(self, items: Sequence[Item]) -> None:
        """Apply a batch of deltas to Redis; returns once every one of them is reflected there (or skipped
        for a stated reason: foreign key, incomplete history). Redis errors propagate; nothing is counted
        for a batch that raised, so a retry counts it once."""
        by_user: dict[str, list[Item]] = {}
        for item in items:
            by_user.setdefault(item.delta["user_id"], []).append(item)
        pending = list(by_user)
        done: dict[str, _Outcome] = {}
        conflicts = 0
        for _ in range(MAX_CAS_ATTEMPTS):
            loaded = await self.store.load_checked(pending)
            outcomes = {u: _fold(loaded.states.get(u), u, by_user[u]) for u in pending if u not in loaded.foreign}
            await self._resync([u for u, o in outcomes.items() if o.gap], by_user, outcomes, loaded.states)
            writes = {u: (o.expected, o.state) for u, o in outcomes.items() if o.state.version > o.expected}
            lost, foreign = await self.store.compare_and_set_checked(writes)
            for user in loaded.foreign | foreign:
                done[user] = _Outcome(ProfileState(user), 0, foreign=True)
            done.update({u: o for u, o in outcomes.items() if u not in lost and u not in foreign})
            conflicts += len(lost)
            pending = sorted(lost)
            if not pending:
                self._count(done, conflicts, len(items), by_user)
                return
        raise RuntimeError(f"compare-and-set kept failing for {pending[:3]}: is something else writing them?")

    def _count(self, done: dict[str, _Outcome], conflicts: int, n_items: int, by_user: dict[str, list[Item]]) -> None:
        stats = self.stats
        for user, outcome in done.items():
            stats.applied += outcome.applied
            stats.skipped += outcome.skipped
            stats.resynced += outcome.gap
            stats.unrepaired += outcome.unrepaired
            if outcome.foreign:
                stats.foreign += len(by_user[user])
                log.warning("redis-sink: key %s holds something that is not a profile (WRONGTYPE or not our "
                            "JSON); %d deltas of that user skipped, the key is left as it is",
                            self.store.key(user), len(by_user[user]))
        stats.conflicts += conflicts
        stats.deltas += n_items

    async def _resync(self, users: list[str], by_user: dict[str, list[Item]], outcomes: dict[str, _Outcome],
                      stored: dict[str, ProfileState]) -> None:
        by_partition: dict[tuple[str, int], dict[str, int]] = {}
        for user in users:
            last = by_user[user][-1]
            by_partition.setdefault((last.topic, last.partition), {})[user] = last.offset
        for (topic, partition), upto in by_partition.items():
            replicas = await self.history(topic, partition, upto)
            incomplete = {gap_user for gap_user, _, _ in replicas.gaps}
            for user in upto:
                outcome = outcomes[user]
                if user in incomplete:
                    outcome.unrepaired = True
                    if user in stored:
                        # Kept: the stored profile plus this batch's deltas up to the gap (all exact).
                        log.warning("redis-sink: the delta topic %s has lost early deltas of %s (retention?); the "
                                    "stored profile (version %d) is kept instead of a partial rebuild",
                                    topic, user, outcome.state.version)
                        continue
                    log.warning("redis-sink: the delta topic %s has lost early deltas of %s (retention?); with "
                                "nothing stored, its profile holds what the remaining deltas give", topic, user)
                outcome.state = replicas.profiles.get(user, outcome.state)
                outcome.applied = 0
                outcome.skipped = 0


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
        try:
            delta = parse_delta(record.value)
        except MalformedDelta:
            continue  # counted and logged when the subscriber met it in the stream
        if record.offset <= upto.get(delta["user_id"], -1):
            replicas.apply(delta)
    return replicas


@dataclass
class Backoff:
    """Exponential wait between retries: initial, doubling, never above `max_s`."""

    initial_s: float = 0.2
    max_s: float = 30.0

    def delay(self, attempt: int) -> float:
        return min(self.max_s, self.initial_s * 2.0 ** min(attempt, 62))


def redis_errors() -> tuple[type[BaseException], ...]:
    """What a lost, refused or stalled Redis connection raises (redis-py wraps socket errors in these)."""
    import redis.exceptions

    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


def _configuration_error(error: BaseException) -> bool:
    """A refused password or ACL: redis-py raises it as a ConnectionError, but waiting does not fix it."""
    import redis.exceptions

    return isinstance(error, redis.exceptions.AuthenticationError | redis.exceptions.AuthorizationError)


async def write_with_retry(sink: DeltaSink, items: Sequence[Item], backoff: Backoff, stop: asyncio.Event,
                           sleep: Callable[[float], Awaitable[None]] | None = None) -> bool:
    """Write a batch until it is in Redis (True) or `stop` is set first (False: commit nothing).

    Each failure counts one reconnect and waits `backoff.delay(attempt)` (cut short by `stop`); redis-py
    reconnects on the next command by itself.
    """
    attempt = 0
    while True:
        try:
            await sink.write(items)
            return True
        except redis_errors() as error:
            if _configuration_error(error):
                raise
            sink.stats.reconnects += 1
            delay = backoff.delay(attempt)
            attempt += 1
            log.warning("redis-sink: Redis failed (%s: %s); batch of %d deltas retried in %.1f s (attempt %d)",
                        type(error).__name__, error, len(items), delay, attempt)
        if stop.is_set():
            return False
        if sleep is not None:
            await sleep(delay)
        else:
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                pass
        if stop.is_set():
            return False
