"""Which partition a user's records live on: the same for our bundles, the table changelog and deltas."""

from __future__ import annotations

from aiokafka.partitioner import murmur2


def partition_for_user(user_id: str, partitions: int) -> int:
    """aiokafka's (Java-compatible) DefaultPartitioner for a UTF-8 key."""
    return (murmur2(user_id.encode()) & 0x7FFFFFFF) % partitions
