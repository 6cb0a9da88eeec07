"""Hands each fetched record to its stream's queue without Faust's per-record coroutines, when nothing can block.

**The fetch loop** (`drain_messages`, replacing faust-streaming 0.15.3's `Consumer._drain_messages`, which it
copies otherwise). For every record Faust's loop awaits the delivery race below, which awaits the conductor's
handler, which awaits flow control, the producer buffer's ebb and the topic's decoder before it puts the event
on the stream's queue: seven coroutines per record, none of which waits for anything in the usual case. Our
loop first asks whether the record can go straight into the queue: the flow is not suspended and the consumer
neither stopping nor crashed, the producer buffer is under its limit, nobody is rebuilding the handler map, the
partition's handler is Faust's compiled `ConductorHandler` with exactly one channel, that channel decodes raw
bytes (`RawDecode`, which cannot fail), and its queue is not full. Then it does what that handler does for one
channel (a reference for the channel, the event built, `put_nowait_enhanced` with the handler's own pressure
callbacks) without a coroutine. Otherwise the record takes Faust's path, unchanged. On the 2-core EPYC this
took the click worker from 126 to 115 us of CPU per event (means of 11 alternating pairs; docs/benchmarks.md,
"Stop 29"). Installed only under the faust-streaming release it was copied from, with its compiled extension.

**The delivery race**, for the records that take Faust's path.

faust-streaming 0.15.3's fetch loop delivers every record through
`self.wait_first(callback(record), self.suspend_flow.wait())`: mode's `wait_first` wraps the delivery, the
flow-suspension wait and the consumer's stopped and crashed events in four tasks, waits for the first, and
cancels the rest. The race matters only when the delivery blocks (flow control suspended for a rebalance, a
full stream queue, a full producer buffer): a suspension must be able to interrupt it. Almost always the
delivery blocks on nothing, and the race costs ~39 us per record on the 2-core development machine (a
worker spent ~130 us of CPU per event in all; docs/benchmarks.md).

`install` (from `build_app`; idempotent) runs the delivery coroutine directly up to its first suspension. If
it completes without suspending, nothing could have raced it: the result is the one `wait_first` returns
when the delivery wins. If it suspends, the started coroutine goes into Faust's race unchanged (resumed from
where it stopped, with the future it waits on), so flow suspension, stop and crash interrupt it as before.
The fast path is never taken while the flow is suspended or the consumer is stopping or crashed.

The conductor's delivery callback looks up each record's handler under an asyncio lock (held while a
resubscription rebuilds the handler map). Taking a free asyncio lock never suspends, so the same lookup without
taking it, while nobody holds it, reads the same complete map; a held lock is still waited for. ~1 us per record.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Coroutine, Generator
from typing import Any, cast

import faust
from faust.transport.conductor import Conductor
from faust.transport.consumer import CONSUMER_FETCHING, Consumer
from faust.types import Message
from mode.services import WaitResults

from stream_app.worker.topics import RawDecode

log = logging.getLogger(__name__)

# drain_messages is this faust-streaming release's Consumer._drain_messages but for one branch.
FETCH_LOOP_COPIED_FROM = "0.15.3"


def compiled_handler_type() -> type | None:
    """The conductor's per-partition handler class when Faust's Cython extension is built (the wheels ship it);
    without it Faust compiles closures, and deliver_now does not know their insides."""
    try:
        from faust.transport._cython.conductor import ConductorHandler
    except ImportError:
        return None
    return cast(type, ConductorHandler)


COMPILED_HANDLER = compiled_handler_type()

_installed = False


@types.coroutine
def resume(coroutine: Coroutine[Any, Any, Any], awaiting: Any) -> Generator[Any, Any, Any]:
    """Continue a coroutine that was stepped by hand and suspended on `awaiting`, as `yield from` would: what
    the task sends or throws in goes on to the coroutine."""
    while True:
        try:
            sent = yield awaiting
        except BaseException as exc:  # noqa: BLE001 - cancellation included: it belongs to the coroutine
            try:
                awaiting = coroutine.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                awaiting = coroutine.send(sent)
            except StopIteration as stop:
                return stop.value


async def continued(coroutine: Coroutine[Any, Any, Any], awaiting: Any) -> Any:
    """`resume` as a native coroutine: mode's `wait_first` takes awaitables, which a generator is not."""
    return await resume(coroutine, awaiting)


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    original_wait_first = Consumer.wait_first

    async def wait_first(self: Any, *coros: Any, timeout: Any = None) -> WaitResults:
        # Only the fetch loop's call has this shape: (delivery coroutine, suspend_flow.wait() coroutine).
        if (len(coros) != 2 or timeout is not None or not all(isinstance(c, Coroutine) for c in coros)
                or self.suspend_flow.is_set() or self._stopped.is_set() or self._crashed.is_set()):
            return await original_wait_first(self, *coros, timeout=timeout)
        delivery, suspension = coros
        try:
            awaiting = delivery.send(None)
        except StopIteration as done:
            suspension.close()  # never started: closing it is all the cleanup it needs
            return WaitResults([delivery], [done.value], False)
        except BaseException:
            suspension.close()
            raise
        return await original_wait_first(self, continued(delivery, awaiting), suspension)

    Consumer.wait_first = wait_first  # type: ignore[method-assign]
    original_compile_message_handler = Conductor._compile_message_handler

    def compile_message_handler(self: Any) -> Any:
        if self.app.client_only:
            return original_compile_message_handler(self)
        handler_for = self._tp_to_callback.__getitem__
        lock = self._tp_to_callback_lock

        async def on_message(message: Message) -> Any:
            if lock.locked():
                async with lock:
                    handler = handler_for(message.tp)
            else:
                handler = handler_for(message.tp)
            return await handler(message)

        return on_message

    Conductor._compile_message_handler = compile_message_handler  # type: ignore[method-assign]
    if faust.__version__ == FETCH_LOOP_COPIED_FROM and COMPILED_HANDLER is not None:
        Consumer._drain_messages = drain_messages  # type: ignore[method-assign]
    else:
        log.warning("faust-streaming %s (compiled extension: %s) is not %s with it: Faust's own fetch loop delivers "
                    "every record (slower)", faust.__version__, COMPILED_HANDLER is not None, FETCH_LOOP_COPIED_FROM)


def deliver_now(handler: Any, message: Message) -> bool:
    """Put `message` on its one stream's queue as `handler` (a `ConductorHandler`) would, if that cannot block
    or fail; False (and nothing done) otherwise. Flow control and the producer buffer are the caller's checks."""
    channels = handler.channels
    if len(channels) != 1:
        return False  # several streams read the partition: Faust's handler decodes for each
    for channel in channels:
        decode = channel.decode
        queue = channel.queue
    if type(decode) is not RawDecode or queue.full():
        return False
    message.refcount += 1  # the one channel's reference, as the handler's message.incref(len(channels))
    queue.put_nowait_enhanced(decode.now(message), on_pressure_high=handler.on_pressure_high,
                              on_pressure_drop=handler.on_pressure_drop)
    return True


async def drain_messages(self: Any, fetcher: Any) -> None:
    """faust-streaming 0.15.3's `Consumer._drain_messages` (its comments left out), with `deliver_now` tried
    before the delivery race. Everything else (offsets, gaps, commits, yielding, stopping) is Faust's."""
    callback = self.callback
    getmany = self.getmany
    consumer_should_stop = self._stopped.is_set
    fetcher_should_stop = fetcher._stopped.is_set
    get_read_offset = self._read_offset.__getitem__
    set_read_offset = self._read_offset.__setitem__
    set_flag = self.diag.set_flag
    unset_flag = self.diag.unset_flag
    commit_every = self._commit_every
    acks_enabled_for = self.app.topics.acks_enabled_for
    # What deliver_now needs to know that nothing can block or race.
    app = self.app
    conductor = app.topics
    handler_for = conductor._tp_to_callback.get
    handler_map_lock = conductor._tp_to_callback_lock
    flow_is_active = app.flow_control.is_active
    producer_buffer = app.producer.buffer
    flow_suspended, crashed = self.suspend_flow.is_set, self._crashed.is_set
    direct = not app.client_only  # a client-only app looks its handlers up by topic alone
    compiled_handler = COMPILED_HANDLER

    yield_every = 100
    num_since_yield = 0
    sleep = asyncio.sleep

    try:
        while not (consumer_should_stop() or fetcher_should_stop()):
            set_flag(CONSUMER_FETCHING)
            ait = getmany(timeout=1.0)
            await self.sleep(0)
            if not self.should_stop:
                async for tp, message in ait:
                    num_since_yield += 1
                    if num_since_yield > yield_every:
                        await sleep(0)
                        num_since_yield = 0

                    offset = message.offset
                    r_offset = get_read_offset(tp)
                    if r_offset is None or offset >= r_offset:
                        gap = offset - (r_offset or 0)
                        if gap > 1 and r_offset:
                            acks_enabled = acks_enabled_for(message.topic)
                            if acks_enabled:
                                await self._add_gap(tp, r_offset + 1, offset)
                        if commit_every is not None:
                            if self._n_acked >= commit_every:
                                self._n_acked = 0
                                await self.commit()
                        handler = handler_for(tp) if direct and not handler_map_lock.locked() else None
                        if not (type(handler) is compiled_handler and flow_is_active() and not flow_suspended()
                                and not consumer_should_stop() and not crashed()
                                and producer_buffer.size <= producer_buffer.max_messages
                                and deliver_now(handler, message)):
                            await self.wait_first(callback(message), self.suspend_flow.wait())
                        set_read_offset(tp, offset)
                    else:
                        self.log.dev("DROPPED MESSAGE ROFF %r: k=%r v=%r", offset, message.key, message.value)
                unset_flag(CONSUMER_FETCHING)

    except self.consumer_stopped_errors:
        if self.transport.app.should_stop:
            self.log.info("Broker stopped consumer, shutting down...")
            return
        raise
    except asyncio.CancelledError:
        if self.transport.app.should_stop:
            self.log.info("Consumer shutting down for user cancel.")
            return
        raise
    except Exception as exc:
        self.log.exception("Drain messages raised: %r", exc)
        raise
    finally:
        unset_flag(CONSUMER_FETCHING)
