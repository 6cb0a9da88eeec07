"""The Redis side of serving: one hash per user, written by compare-and-set on its version.

Layout: key `profile:{user_id}` (the id as it is on the delta topic: a pseudonym when
PROFILE_PSEUDONYM_KEY is set) is a hash with two fields:

* `version`: the last delta version applied, a decimal integer;
* `state`: JSON of the subscriber's `ProfileState` (stored forward-decayed sums, landmark, half-life,
  `as_of` and `version` again), exactly what `stream_app.core.replica.apply_delta` works on.

A hash and not one JSON string, because the compare-and-set script then checks an integer field in O(1)
instead of parsing a profile (hundreds of floats with an embedding) inside Redis on every write; and the
state is one JSON document, not one field per key, because it is nested and always read and written whole.
JSON floats round-trip exactly (orjson writes the shortest repr), so Redis holds bit for bit what
`ProfileReplicas` would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import orjson

from stream_app.core.profile import ProfileState
from stream_app.ops.settings import Settings

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


def redis_client(settings: Settings, url: str | None = None) -> Any:
    import redis.asyncio

    password = settings.redis_password.get_secret_value() if settings.redis_password is not None else None
    return redis.asyncio.from_url(url or settings.redis_url, password=password)


