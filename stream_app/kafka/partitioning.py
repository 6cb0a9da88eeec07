"""Which partition a user's records live on: the same for our bundles, the table changelog and deltas.

aiokafka's murmur2 is pure Python (~5-8 us per key here) and one event's user id is hashed three times on its
way (its bundle, its table write, its delta): `key_hash` remembers the hashes of recent keys, and the producer
uses it too (`KeyPartitioner`, Faust's `producer_partitioner`), so a user is hashed about once per batch.
"""

from __future__ import annotations

from typing import Final

from aiokafka.partitioner import DefaultPartitioner, murmur2

_MAX_REMEMBERED: Final = 1 << 16  # keys; about 8 MB at most, then the memory starts afresh
_hashes: dict[bytes, int] = {}


def key_hash(key: bytes) -> int:
    """murmur2(key) & 0x7FFFFFFF, what the Java client and aiokafka's DefaultPartitioner take modulo the count."""
    found = _hashes.get(key)
    if found is None:
        if len(_hashes) >= _MAX_REMEMBERED:
            _hashes.clear()
        found = _hashes[key] = murmur2(key) & 0x7FFFFFFF
    return found


def partition_for_user(user_id: str, partitions: int) -> int:
    """aiokafka's (Java-compatible) DefaultPartitioner for a UTF-8 key."""
    return key_hash(user_id.encode()) % partitions


class KeyPartitioner(DefaultPartitioner):
    """aiokafka's DefaultPartitioner with the key hashes remembered (the same partition for every key)."""

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if key is None:
            return super().__call__(key, all_partitions, available)
        return all_partitions[key_hash(key) % len(all_partitions)]
