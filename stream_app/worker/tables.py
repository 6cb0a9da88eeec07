"""The profile table: user id -> ProfileState.to_dict(), backed by a changelog topic."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any

import faust
import orjson
from faust import Table
from faust.types import TP, EventT, FutureMessage
from faust.types.enums import ProcessingGuarantee

from stream_app.kafka.batched_send import aiokafka_producer, send_batched
from stream_app.kafka.partitioning import partition_for_user
from stream_app.ops.settings import Settings


class ProfileTable(Table[str, Any]):
    """A table whose writes can be awaited until the broker has stored them.

    Faust queues changelog writes in its producer buffer and sends them later, while deltas go straight to
    the producer, so a delta could reach the broker before the table write of its version. A crash in between
    lost the write but not the delta: the restarted worker counted the redelivered events again under the
    same version number, usually in a differently composed batch, and subscribers skipped that second delta
    as a duplicate, missing whatever only it changed. Faust's own flush before a commit does not close the
    window either: it stops waiting for its buffer after 0.1 s without progress.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unconfirmed: list[Awaitable[Any]] = []
        # Users whose state this worker read from the changelog (recovery, standby) and has not folded since: their
        # newest delta may be unsent (`stream_app.core.fold.unsent_after_recovery`). At most the table's users.
        self.unsettled: set[str] = set()

    def apply_changelog_batch(self, batch: Iterable[EventT]) -> None:
        events = list(batch)
        super().apply_changelog_batch(events)
        store = self.data
        self.unsettled.update(key for key in (self._to_key(event.key) for event in events) if key in store)

    async def on_rebalance(self, assigned: set[TP], revoked: set[TP], newly_assigned: set[TP],
                           generation_id: int = 0) -> None:
        await super().on_rebalance(assigned, revoked, newly_assigned, generation_id)
        store = self.data
        # Revoked partitions' users left the store; in place, since a fold in progress holds this set.
        self.unsettled.difference_update([key for key in self.unsettled if key not in store])

    def settle(self, users: Iterable[str]) -> None:
        """These users' deltas are confirmed: nothing of theirs is unsent now."""
        if self.unsettled:  # empty once every recovered user has folded: no pass over each batch's users then
            self.unsettled.difference_update(users)

    def send_changelog(self, *args: Any, **kwargs: Any) -> FutureMessage:
        sent = super().send_changelog(*args, **kwargs)
        self._unconfirmed.append(sent)
        return sent

    def stored(self, key: str) -> dict[str, Any] | None:
        """`self.get(key)`, without the KeyError that `Mapping.get` raises and catches inside Faust's lookup for
        every user the table does not hold yet (~1-2 us per event on a backlog of new users). The table-get
        sensor still sees each lookup."""
        self.on_key_get(key)
        store = self.data
        return store[key] if key in store else None

    async def write_many(self, values: Mapping[str, dict[str, Any]], encoded: Mapping[str, bytes]) -> None:
        """`self[key] = value` for each, with the changelog records handed straight to the producer.

        Faust's `__setitem__` queues each write in its producer buffer, which a background task sends one
        record per loop turn (a FutureMessage, a sensor call and often a produce request of its own per write:
        ~35-45 us of CPU per written user). Here the writes of a batch go to aiokafka as one batch per
        partition (`send_batched`), so they leave in a few requests. The records are the ones Faust would
        write: the UTF-8 key, the state as orjson JSON (`encoded` where the fold already serialised it, as
        Faust's json codec would), on the partition the producer's default partitioner picks for the key
        (`use_partitioner=True`). Recovery and standbys read them from the changelog like any other.
        Confirmed by `confirm_writes`, as before.

        Under exactly_once the writes must go through the transaction of the input they came from, which only
        Faust's own path knows: there they take `__setitem__`.
        """
        if self.app.conf.processing_guarantee != ProcessingGuarantee.AT_LEAST_ONCE:
            for key, value in values.items():
                self[key] = value
            return
        partitions, store = self.partitions or self.app.conf.topic_partitions, self.data
        records = []
        for key, value in values.items():
            data = encoded.get(key)
            records.append((partition_for_user(key, partitions), key.encode(),
                            orjson.dumps(value) if data is None else data))
            store[key] = value  # the store under the table, without a second changelog write
        self._unconfirmed.extend(await send_batched(aiokafka_producer(self.app.producer),
                                                    self.changelog_topic.get_topic_name(), records))

    async def confirm_writes(self) -> None:
        """Return once every write so far is acknowledged by the broker (raise if one failed)."""
        pending, self._unconfirmed = self._unconfirmed, []
        if pending:
            await asyncio.gather(*pending)


def profile_table(app: faust.App, settings: Settings) -> ProfileTable:
    table = ProfileTable(
        app,
        name="profiles",
        default=None,
        beacon=app.tables.beacon,
        partitions=settings.partitions,
        key_type=str,
        # Partition the changelog by the key's hash, like events_by_user, instead of by "the current event":
        # a micro-batch spans several partitions, and Faust's current event is only the batch's last one.
        use_partitioner=True,
        help="Per-user decayed profile state",
    )
    app.tables.add(table)
    # Faust derives serializers from key_type/value_type and would JSON-encode the key ("\"u1\""), which
    # hashes to another partition than the plain UTF-8 key of events_by_user. Writes take the table's
    # serializer, recovery reads with the changelog topic's: rebuild the topic so both use UTF-8.
    table.key_serializer = "utf8"
    table.value_serializer = "json"
    table.changelog_topic = table._new_changelog_topic(compacting=True)
    return table
