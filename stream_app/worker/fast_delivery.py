"""Hands each fetched record to its streams without four asyncio tasks per record, when nothing can block.

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

import types
from collections.abc import Coroutine, Generator
from typing import Any

from faust.transport.conductor import Conductor
from faust.transport.consumer import Consumer
from faust.types import Message
from mode.services import WaitResults

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
