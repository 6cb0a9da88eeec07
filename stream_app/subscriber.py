"""The subscriber library: rebuild profiles from the `profile-deltas` topic.

Applying every delta of a user in order to an empty `ProfileState` gives exactly the worker's table
state (the same floating-point operations in the same order), so `view(at)` matches the worker's.

Deltas may be delivered more than once (re-emitted after a crash): a delta whose version is not newer
than the replica's is skipped. A version jump (a lost delta) is applied anyway and recorded in `gaps`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from stream_app.decay import rescale_factor
from stream_app.profile import MEAN_FIELDS, Delta, ProfileState, scale_sums
from stream_app.settings import Settings

SUM_FIELDS = ("activity", "interests", "keywords")


def apply_delta(state: ProfileState, delta: Delta) -> bool:
    """Apply one delta to a replica. False when it is a duplicate (not newer than the replica)."""
    if delta["version"] <= state.version:
        return False
    landmark = delta["landmark"]
    if state.landmark is not None and landmark != state.landmark:
        scale_sums(state, rescale_factor(state.landmark, landmark, delta["half_life_s"]))
    state.landmark = landmark
    state.half_life_s = delta["half_life_s"]
    state.as_of = delta["as_of"]
    state.version = delta["version"]
    for name in SUM_FIELDS:
        changed = delta.get(name)
        if changed:
            getattr(state, name).update(changed)
    for name, keys in delta.get("dropped", {}).items():
        values = getattr(state, name)
        for key in keys:
            values.pop(key, None)
    for name in MEAN_FIELDS:
        if name in delta:
            setattr(state, name, list(delta[name]))
    if "embedding" in delta:
        state.embedding_num = list(delta["embedding"]["num"])
        state.embedding_den = delta["embedding"]["den"]
    return True


@dataclass
class ProfileReplicas:
    """All users' profiles rebuilt from a delta stream."""

    profiles: dict[str, ProfileState] = field(default_factory=dict)
    gaps: list[tuple[str, int, int]] = field(default_factory=list)  # (user, expected version, got)
    duplicates: int = 0

    def apply(self, delta: Delta) -> bool:
        user_id = delta["user_id"]
        state = self.profiles.get(user_id)
        if state is None:
            state = self.profiles[user_id] = ProfileState(user_id)
        if delta["version"] > state.version + 1:
            self.gaps.append((user_id, state.version + 1, delta["version"]))
        applied = apply_delta(state, delta)
        if not applied:
            self.duplicates += 1
        return applied

    def apply_all(self, deltas: Iterable[Delta]) -> ProfileReplicas:
        for delta in deltas:
            self.apply(delta)
        return self

    def views(self, at: float | None = None) -> Iterator[dict[str, Any]]:
        for user_id in sorted(self.profiles):
            yield self.profiles[user_id].view(at)


async def read_topic(settings: Settings, topic: str, idle_timeout_s: float = 30.0) -> list[Any]:
    """Every record (aiokafka ConsumerRecord) of a topic from the beginning to its current end.

    The end is the high watermark that fetch responses report (correct on Kafka and on Tansu, whose
    ListOffsets is not), so this reads exactly what was there when it started.
    """
    from aiokafka.structs import TopicPartition

    from stream_app.kafka_clients import consumer

    client = consumer(settings)
    await client.start()
    try:
        partitions = client.partitions_for_topic(topic)
        if partitions is None:
            await client._client.force_metadata_update()  # topic metadata is fetched lazily
            partitions = client.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
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


async def read_deltas(settings: Settings) -> list[Delta]:
    return [orjson.loads(r.value) for r in await read_topic(settings, settings.topic_deltas) if r.value is not None]


async def snapshot(settings: Settings, at: float | None = None) -> list[dict[str, Any]]:
    return list(ProfileReplicas().apply_all(await read_deltas(settings)).views(at))
