"""Micro-batches read straight from an agent's channel: what Faust's `Stream.take_events` yields, for less work
per event.

`take_events` moves every event through the stream's iterator into its buffer in a second task (the passive
drainer: a processor coroutine and an `await` per event) and acknowledges a finished batch one
`await stream.ack(event)` at a time, each taking Faust's `ack_lock` three times: ~10 us of event-loop work per
event on the 2-core development machine (docs/benchmarks.md), for what is a queue read and a reference count.

`take_batches` reads the channel's queue itself and keeps the per-event bookkeeping of Faust's stream iterator
(faust-streaming 0.15.3, `faust/_cython/streams.pyx`, pinned in requirements.lock):

- an event of an older consumer generation, or taken while flow control is suspended (a rebalance), is dropped
  unacknowledged, as the iterator drops it (its partition is sought back and it comes again);
- each message of an acking topic is tracked as unacknowledged once (`Consumer.track_message`:
  `Consumer.wait_empty` waits for those before a rebalance goes on);
- the stream-event sensors see every event in and out, the message-out sensor every message whose last
  reference is dropped.

A batch is acknowledged when the agent asks for the next one, as with `take_events`: only then can its offsets
be committed. Unlike `take_events`, a batch whose processing raised is never acknowledged (`take_events` acks
it when the abandoned generator is finalised): the worker stops on the error, and the batch comes again.

Size: a batch also leaves once the records of its events reach `max_bytes` (keys and values; the event that
crosses it is the last one in), so a batch of records near the size limit cannot hold `max_` of them.

Window, as `take_events`: a batch leaves when it holds `max_` events, or when `within` seconds have passed since
the previous batch was finished (or since the last empty window) and it holds at least one. An idle agent waits
for its next event without waking up at each window end; windows are counted as if it had.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any, cast

from faust.events import Event
from faust.types import ChannelT, EventT, StreamT
from faust.types.tuples import ack_lock
from mode.utils.futures import notify

from stream_app.worker.buffers import record_bytes


async def take_batches(stream: StreamT[Any], max_: int, within: float,
                       max_bytes: int | None = None) -> AsyncIterator[list[EventT]]:
    if max_ < 1 or within <= 0 or (max_bytes is not None and max_bytes < 1):
        raise ValueError(f"take_batches needs max_ >= 1, within > 0 and max_bytes >= 1 or None, got {max_}, "
                         f"{within} and {max_bytes}")
    app = stream.app
    # What take_events iterates; the agent's channel is an iterator already (aiter gives it back).
    channel = cast(ChannelT[Any], aiter(stream.channel))
    queue = channel.queue
    consumer, flow_control, acks_enabled_for = app.consumer, app.flow_control, app.topics.acks_enabled_for
    on_event_in = stream._on_stream_event_in  # type: ignore[attr-defined]
    loop = asyncio.get_running_loop()
    started_here = await stream.maybe_start()
    events: list[EventT] = []
    sensor_states: list[Any] = []
    held_bytes = 0
    byte_limit = max_bytes if max_bytes is not None else float("inf")
    ended = False
    try:
        deadline = loop.time() + within
        while not (ended or stream.should_stop):
            while len(events) < max_ and held_bytes < byte_limit:
                try:
                    if not queue.empty():
                        item = queue.get_nowait()
                    elif not events:
                        # Nothing is held back: wait for the first event without a timer. An idle agent that
                        # woke up at every window end would poll (~0.5 % of a core per agent at 20 ms, CPU
                        # the review encoder wants); the batch still leaves at the end of the window the event
                        # arrived in, as if the windows had been ticking meanwhile.
                        item = await queue.get()
                        now = loop.time()
                        if now >= deadline:
                            deadline += within * (math.floor((now - deadline) / within) + 1)
                    else:
                        remaining = deadline - loop.time()
                        if remaining <= 0:
                            break
                        try:
                            async with asyncio.timeout(remaining):
                                item = await queue.get()
                        except TimeoutError:
                            break
                except StopAsyncIteration:  # thrown into the channel when it ends (as Faust's iterator ends)
                    ended = True
                    break
                if not isinstance(item, Event):
                    raise TypeError(f"take_batches reads events, the channel gave {type(item).__name__}")
                message = item.message
                if not flow_control.is_active() or message.generation_id != app.consumer_generation_id:
                    continue  # a rebalance is under way or was: the partition is sought back, this comes again
                if not message.tracked and acks_enabled_for(message.topic):
                    message.tracked = True
                    consumer.track_message(message)
                sensor_states.append(on_event_in(message.tp, message.offset, stream, item))
                events.append(item)
                held_bytes += record_bytes(item)
            if events:
                stream.events_total += len(events)  # type: ignore[attr-defined]
                yield events  # raises here if the agent fails: then nothing of the batch is acknowledged
                acknowledge(stream, events, sensor_states)
                events, sensor_states, held_bytes = [], [], 0
            deadline = loop.time() + within
    finally:
        stop_iteration = getattr(channel, "on_stop_iteration", None)
        if stop_iteration is not None:
            stop_iteration()
        if started_here:
            await stream.stop()


def acknowledge(stream: StreamT[Any], events: list[EventT], sensor_states: list[Any]) -> None:
    """`Stream.ack` for each event, as Faust's compiled stream iterator does it (`Message.ack` and `Consumer.ack`
    inlined, `StreamIterator.after`), under one hold of `ack_lock` and with one wake-up of a waiting
    `Consumer.wait_empty` for the batch instead of three lock holds and a wake-up per message."""
    app = stream.app
    consumer: Any = app.consumer
    acks_enabled_for = app.topics.acks_enabled_for
    committed_offsets, acked_index, acked = consumer._committed_offset, consumer._acked_index, consumer._acked
    unacked = consumer._unacked_messages
    finished: list[Any] = []
    with ack_lock:
        try:
            for event in events:
                message = event.message
                if message.acked:
                    continue
                refcount = message.refcount = max(message.refcount - 1, 0)
                if refcount:
                    continue  # another stream still holds it
                message.acked = True
                if not acks_enabled_for(message.topic):
                    continue
                tp, offset = message.tp, message.offset
                committed = committed_offsets[tp]
                if committed is None or offset >= committed:
                    offsets = acked_index[tp]
                    if offset not in offsets:
                        unacked.discard(message)
                        offsets.add(offset)
                        acked[tp].append(offset)
                        consumer._n_acked += 1
                        finished.append(message)
        finally:
            notify(consumer._waiting_for_ack)
    on_event_out = stream._on_stream_event_out  # type: ignore[attr-defined]
    for event, state in zip(events, sensor_states, strict=True):
        on_event_out(event.message.tp, event.message.offset, stream, event, state)
    on_message_out = stream._on_message_out  # type: ignore[attr-defined]
    for message in finished:
        on_message_out(message.tp, message.offset, message)
