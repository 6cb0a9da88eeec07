"""Input offsets are committed only past records the agents have processed, whatever a rebalance does.

faust-streaming 0.15.3's consumer loses records around rebalances; each item below was seen in a worker's
log when a SIGKILLed worker's partitions moved to a survivor (tests/integration/test_crash.py), and each
lost records for good, because the commit went past them:

1. **Drops after a seek.** The fetch loop remembers the last offset it read per partition and drops any
   record below it as already seen. Around a rebalance, records fetched before the seek to the committed
   offset are still delivered after it (the stream partitions resume before the seek), so the remembered
   offset runs ahead and the records fetched again from the committed offset are dropped although the first
   copies were never processed (they were discarded with the rebalance's buffers).
2. **False gaps.** A jump from the remembered offset to the next delivered one is taken for offsets missing
   from the log (transaction markers, compaction) and counted as processed. After a seek that jump spans
   real records.
3. **Committing past one missing offset.** The commit goes to the end of the first run of consecutive
   processed offsets unless that run starts *more than one* past the committed offset: a single unprocessed
   record at the head is skipped. (A committed offset of 0 disables the check.)
4. **No seek without a commit.** aiokafka's seek_to_committed leaves a partition without a committed offset
   (or at 0) where its fetch position happens to be, past whatever was fetched and discarded before.
5. **Cleared after the seek.** At the end of a table recovery Faust seeks the stream partitions to their
   committed offsets and only then resumes flow control, which empties every stream queue: a record fetched
   again in between and not yet taken by its agent is gone, and nothing fetches it again.

What this module installs instead (`install`, from `build_app`; idempotent):

- Records are never dropped as already seen: a record delivered twice is processed twice, which the profile
  state's per-event dedup makes harmless (it is how every redelivery after a crash is handled anyway).
- Offsets count as missing from the log only when the broker says so: two records of one partition that come
  back consecutively in one fetch result, or in two results with no seek, flow stop or rebalance in between.
- The commit advances only over a run of processed (or really missing) offsets that starts exactly at the
  committed offset.
- After the seek to committed offsets, a stream partition without a committed offset is sought to its first
  offset (what `consumer_auto_offset_reset=earliest` means), and that offset is the base of its commits.
- If that resume emptied a queue that held records, the stream partitions are sought to their committed
  offsets once more; whatever was taken already comes again as a duplicate.

If the head of a partition stays unprocessed for `STUCK_WARNING_S`, a warning names the partition and offset
(commits then wait there; nothing is skipped).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any, Final

from faust.tables.recovery import Recovery
from faust.transport.consumer import Consumer
from faust.types import TP, Message
from faust.utils.functional import consecutive_numbers

STUCK_WARNING_S: Final = 60.0

logger = logging.getLogger(__name__)
_installed = False


class _NeverRead(dict[Any, Any]):
    """Faust's per-partition 'last offset read': the fetch loop reads None for every partition, so it neither
    drops a record as already seen nor invents a gap (items 1 and 2); writes are kept for anything else."""

    def __getitem__(self, key: Any) -> None:
        return None


class _Contiguity:
    """Per partition, the last offset the fetch loop delivered in the current fetch epoch; the epoch moves on
    (and forgets them) at every seek, flow stop and rebalance, after which the next record says nothing about
    gaps. A fetch that began in an earlier epoch records nothing."""

    def __init__(self) -> None:
        self.epoch = 0
        self.last: dict[TP, int] = {}

    def reset(self) -> None:
        self.epoch += 1
        self.last.clear()


def _contiguity(consumer: Any) -> _Contiguity:
    state = consumer.__dict__.get("_stream_app_contiguity")
    if state is None:
        state = consumer.__dict__["_stream_app_contiguity"] = _Contiguity()
    return state


def new_offset(acked: list[int], committed: int | None) -> tuple[int | None, list[int]]:
    """The offset to commit (or None) and what stays acknowledged, given the acknowledged (or really missing)
    offsets of one partition and its committed offset (the next one to process; None: not known)."""
    if not acked:
        return None, acked
    acked = sorted(set(acked))
    if committed is not None and acked[0] > committed:
        return None, acked  # the record at the committed offset is not processed yet: nothing to commit
    run = next(consecutive_numbers(acked))
    return run[-1] + 1, acked[len(run):]


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True

    original_init = Consumer.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self._read_offset = _NeverRead()

    def _new_offset(self: Any, tp: TP) -> int | None:
        acked: list[int] = self._acked[tp]
        gaps = self._gap[tp]
        if acked and gaps:
            top = max(acked)
            for interval in sorted(gaps.overlap(0, top), key=lambda i: i.begin):
                acked.extend(range(interval.begin, interval.end))
            gaps.chop(0, top)
        committed = self._committed_offset[tp]
        offset, rest = new_offset(acked, committed)
        if offset is None:
            _warn_if_stuck(self, tp, committed, rest)
        else:
            self._acked_index[tp].difference_update([o for o in acked if o < offset])
        acked[:] = rest
        return offset

    original_getmany = Consumer.getmany

    async def getmany(self: Any, timeout: float) -> AsyncIterator[tuple[TP, Message]]:
        contiguity = _contiguity(self)
        epoch = contiguity.epoch
        async for tp, message in original_getmany(self, timeout):
            if contiguity.epoch == epoch:
                previous = contiguity.last.get(tp)
                if previous is not None and message.offset > previous + 1:
                    # Consecutive in what the broker sent: the offsets between do not exist (markers, compaction).
                    await self._add_gap(tp, previous + 1, message.offset - 1)
                contiguity.last[tp] = message.offset
            yield tp, message

    original_perform_seek = Consumer.perform_seek

    async def perform_seek(self: Any) -> None:
        _contiguity(self).reset()
        await original_perform_seek(self)
        await _seek_uncommitted_to_beginning(self)
        _contiguity(self).reset()

    original_seek = Consumer.seek

    async def seek(self: Any, partition: TP, offset: int) -> None:
        _contiguity(self).reset()
        await original_seek(self, partition, offset)

    original_stop_flow = Consumer.stop_flow

    def stop_flow(self: Any) -> None:
        _contiguity(self).reset()
        original_stop_flow(self)

    original_revoked = Consumer.on_partitions_revoked

    async def on_partitions_revoked(self: Any, revoked: set[TP]) -> None:
        _contiguity(self).reset()
        await original_revoked(self, revoked)

    original_recovery_completed = Recovery.on_recovery_completed

    async def on_recovery_completed(self: Any, generation_id: int = 0) -> None:
        flow_control = self.app.flow_control
        discarded: list[int] = []

        def clear() -> None:
            discarded.extend(queue.qsize() for queue in flow_control._queues)
            type(flow_control).clear(flow_control)

        flow_control.clear = clear
        try:
            await original_recovery_completed(self, generation_id)
        finally:
            del flow_control.clear
        consumer = self.app.consumer
        if any(discarded) and self.app.consumer_generation_id == generation_id and consumer.assignment():
            logger.info("Records fetched after the seek were discarded when flow resumed: seeking again")
            await consumer.perform_seek()

    Recovery.on_recovery_completed = on_recovery_completed  # type: ignore[method-assign]
    Consumer.__init__ = __init__  # type: ignore[method-assign]
    Consumer._new_offset = _new_offset  # type: ignore[method-assign]
    Consumer.getmany = getmany  # type: ignore[method-assign]
    Consumer.perform_seek = perform_seek  # type: ignore[method-assign]
    Consumer.seek = seek  # type: ignore[method-assign]
    Consumer.stop_flow = stop_flow  # type: ignore[method-assign]
    Consumer.on_partitions_revoked = on_partitions_revoked  # type: ignore[method-assign]


async def _seek_uncommitted_to_beginning(consumer: Any) -> None:
    changelogs = consumer.app.tables.changelog_topics
    uncommitted = [tp for tp in consumer.assignment()
                   if tp.topic not in changelogs and not consumer._committed_offset.get(tp)]
    if not uncommitted:
        return
    earliest = await consumer.earliest_offsets(*uncommitted)
    for tp in uncommitted:
        first = earliest.get(tp) or 0
        await consumer.seek(tp, first)
        consumer._committed_offset[tp] = first


def _warn_if_stuck(consumer: Any, tp: TP, committed: int | None, waiting: Iterable[int]) -> None:
    if committed is None or not list(waiting):
        return
    stuck: dict[TP, tuple[int, float, bool]] = consumer.__dict__.setdefault("_stream_app_stuck", {})
    since_offset, since, warned = stuck.get(tp, (committed, time.monotonic(), False))
    if since_offset != committed:
        since_offset, since, warned = committed, time.monotonic(), False
    if not warned and time.monotonic() - since > STUCK_WARNING_S:
        logger.warning("Commits of %s wait at offset %d: later records are processed but this one has not "
                       "been delivered for %.0f s", tp, committed, time.monotonic() - since)
        warned = True
    stuck[tp] = (since_offset, since, warned)
