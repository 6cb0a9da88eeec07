"""The Redis side of serving: one hash per user and delta topic, written by compare-and-set on its version.

Layout: key `profile:{topic}:{user_id}`, where `topic` is the delta topic the profile was built from (Kafka
topic names cannot hold `:`, so the split is unambiguous) and `user_id` the id as it is on that topic (a
pseudonym when PROFILE_PSEUDONYM_KEY is set). Carrying the topic keeps sources apart: a subscriber of a
replay's delta topic and one of the live topic can write the same Redis, and neither sees, skips or
overwrites the other's versions. The hash has two fields:

* `version`: the last delta version applied, a decimal integer;
* `state`: JSON of the subscriber's `ProfileState` (stored forward-decayed sums, landmark, half-life,
  `as_of` and `version` again), exactly what `stream_app.core.replica.apply_delta` works on.

A hash and not one JSON string, because the compare-and-set script then checks an integer field in O(1)
instead of parsing a profile (hundreds of floats with an embedding) inside Redis on every write; and the
state is one JSON document, not one field per key, because it is nested and always read and written whole.
JSON floats round-trip exactly (orjson writes the shortest repr), so Redis holds bit for bit what
`ProfileReplicas` would.

A key holding something else (another type: WRONGTYPE; a hash whose `state` is not ours) is *foreign*: it
is reported per user and never read or overwritten, so whoever wrote it decides what happens to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from stream_app.core.profile import ProfileState
from stream_app.ops.settings import Settings

KEY_PREFIX: Final = "profile:"
MAX_CAS_ATTEMPTS: Final = 20

# KEYS[1]: profile key; ARGV: expected stored version, new version, new state JSON.
# Returns -1 when written, otherwise the version that is stored (someone else wrote first).
# A key of another type makes HGET fail with WRONGTYPE before anything is written.
CAS_SCRIPT: Final = """
local stored = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if stored ~= tonumber(ARGV[1]) then
  return stored
end
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'state', ARGV[3])
return -1
"""


def key_prefix(topic: str) -> str:
    if not topic or ":" in topic:
        raise ValueError(f"not a Kafka topic name: {topic!r}")
    return f"{KEY_PREFIX}{topic}:"


def profile_key(topic: str, user_id: str) -> str:
    return f"{key_prefix(topic)}{user_id}"


def encode_state(state: ProfileState) -> bytes:
    doc = state.to_dict()
    del doc["seen"], doc["outbox"]  # worker-only bookkeeping, always empty in a replica
    return orjson.dumps(doc)


def decode_state(raw: bytes | str) -> ProfileState:
    return ProfileState.from_dict(orjson.loads(raw))


def _is_foreign(result: Any) -> bool:
    """A per-command error reply that says the key is not one of ours (the others are raised)."""
    import redis.exceptions

    return isinstance(result, redis.exceptions.ResponseError) and "WRONGTYPE" in str(result)


@dataclass
class Loaded:
    """States of the users asked for; `foreign`: users whose key holds something that is not our profile."""

    states: dict[str, ProfileState] = field(default_factory=dict)
    foreign: set[str] = field(default_factory=set)


class ProfileStore:
    """The Redis side for one delta topic: load states, compare-and-set them, read them back (redis.asyncio)."""

    def __init__(self, client: Any, topic: str) -> None:
        self.client = client
        self.topic = topic
        self.prefix = key_prefix(topic)
        self._cas = client.register_script(CAS_SCRIPT)

    def key(self, user_id: str) -> str:
        return f"{self.prefix}{user_id}"

    async def load_checked(self, user_ids: Sequence[str]) -> Loaded:
        loaded = Loaded()
        if not user_ids:
            return loaded
        async with self.client.pipeline(transaction=False) as pipe:
            for user_id in user_ids:
                pipe.hget(self.key(user_id), "state")
            raws = await pipe.execute(raise_on_error=False)
        for user_id, raw in zip(user_ids, raws, strict=True):
            if raw is None:
                continue
            if isinstance(raw, Exception):
                if _is_foreign(raw):
                    loaded.foreign.add(user_id)
                    continue
                raise raw
            try:
                loaded.states[user_id] = decode_state(raw)
            except (ValueError, TypeError, KeyError, AttributeError):
                loaded.foreign.add(user_id)  # a hash with our field names but not our JSON
        return loaded

    async def load(self, user_ids: Sequence[str]) -> dict[str, ProfileState]:
        return (await self.load_checked(user_ids)).states

    async def get(self, user_id: str) -> ProfileState | None:
        return (await self.load([user_id])).get(user_id)

    async def compare_and_set_checked(self, writes: dict[str, tuple[int, ProfileState]]) -> tuple[set[str], set[str]]:
        """Write each user's state if its stored version is still the expected one: (lost, foreign) users."""
        if not writes:
            return set(), set()
        async with self.client.pipeline(transaction=False) as pipe:
            for user_id, (expected, state) in writes.items():
                await self._cas(keys=[self.key(user_id)], args=[expected, state.version, encode_state(state)],
                                client=pipe)
            results = await pipe.execute(raise_on_error=False)
        lost, foreign = set(), set()
        for user_id, result in zip(writes, results, strict=True):
            if isinstance(result, Exception):
                if not _is_foreign(result):
                    raise result
                foreign.add(user_id)
            elif int(result) != -1:
                lost.add(user_id)
        return lost, foreign

    async def compare_and_set(self, writes: dict[str, tuple[int, ProfileState]]) -> set[str]:
        """Write each user's state if its stored version is still the expected one; the users that lost."""
        lost, foreign = await self.compare_and_set_checked(writes)
        return lost | foreign

    async def user_ids(self) -> list[str]:
        found = [key.decode() if isinstance(key, bytes) else key
                 async for key in self.client.scan_iter(match=f"{self.prefix}*", count=1000)]
        return sorted(key[len(self.prefix):] for key in found)

    async def views(self, user_ids: Sequence[str] | None = None, at: float | None = None) -> list[dict[str, Any]]:
        """Profiles as `stream-app snapshot` prints them (sorted by user id; unknown and foreign keys left out)."""
        wanted = await self.user_ids() if user_ids is None else sorted(user_ids)
        states = await self.load(wanted)
        return [states[u].view(at) for u in wanted if u in states]


def redis_client(settings: Settings, url: str | None = None) -> Any:
    """The subscriber's client: bounded connect and read times, so a stalled Redis is an error, not a hang."""
    import redis.asyncio
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    password = settings.redis_password.get_secret_value() if settings.redis_password is not None else None
    # No per-command retries inside redis-py (its default: 3, with up to 10 s waits, invisible): the sink
    # retries whole batches with its own bounded backoff, counted and logged (redis_sink.write_with_retry).
    return redis.asyncio.from_url(url or settings.redis_url, password=password,
                                  socket_timeout=settings.redis_socket_timeout_s,
                                  socket_connect_timeout=settings.redis_connect_timeout_s,
                                  retry=Retry(NoBackoff(), 0))
