"""The fetch loop's direct delivery and its delivery race, without coroutines or tasks when nothing blocks
(stream_app/worker/fast_delivery.py)."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import AsyncIterator
from typing import Any

import faust
import pytest
from faust.transport._cython.conductor import ConductorHandler
from faust.transport.conductor import Conductor
from faust.transport.consumer import Consumer, ConsumerMessage
from faust.types import TP
from mode import Service
from mode.utils.locks import Event

from stream_app.worker import buffers, commit_safety, fast_delivery
from stream_app.worker.topics import RawBytes


class FetchLoopOwner(Service):
    """What the patched `Consumer.wait_first` reads of its consumer: mode's service events and suspend_flow."""

    def __init__(self) -> None:
        super().__init__()
        self.suspend_flow = Event()


@pytest.fixture
def consumer() -> FetchLoopOwner:
    fast_delivery.install()
    return FetchLoopOwner()


async def test_a_delivery_that_blocks_on_nothing_runs_in_the_fetch_loops_task(consumer: FetchLoopOwner) -> None:
    ran_in: list[asyncio.Task[Any] | None] = []

    async def deliver() -> str:
        ran_in.append(asyncio.current_task())
        return "delivered"

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the unused suspend_flow.wait() must not warn "never awaited"
        result = await Consumer.wait_first(consumer, deliver(), consumer.suspend_flow.wait())
    assert ran_in == [asyncio.current_task()]
    assert (result.results, result.stopped) == (["delivered"], False)


async def test_a_delivery_that_blocks_is_raced_against_flow_suspension(consumer: FetchLoopOwner) -> None:
    unblock = asyncio.Event()
    steps: list[str] = []

    async def deliver() -> None:
        steps.append("started")
        try:
            await unblock.wait()
            steps.append("finished")
        except asyncio.CancelledError:
            steps.append("cancelled")
            raise

    waiting = asyncio.ensure_future(Consumer.wait_first(consumer, deliver(), consumer.suspend_flow.wait()))
    await asyncio.sleep(0.01)
    assert steps == ["started"] and not waiting.done()
    consumer.suspend_flow.set()  # a rebalance: the fetch loop must not stay stuck in the delivery
    result = await asyncio.wait_for(waiting, 1)
    await asyncio.sleep(0)
    assert result.results == [True]  # suspend_flow.wait() won
    assert steps == ["started", "cancelled"]  # the cancellation reached the delivery where it waited


async def test_a_delivery_that_blocks_finishes_where_it_stopped(consumer: FetchLoopOwner) -> None:
    queue: asyncio.Queue[int] = asyncio.Queue(maxsize=1)
    queue.put_nowait(1)

    async def deliver() -> int:
        await queue.put(2)  # full: suspends until the stream takes one
        return queue.qsize()

    waiting = asyncio.ensure_future(Consumer.wait_first(consumer, deliver(), consumer.suspend_flow.wait()))
    await asyncio.sleep(0.01)
    assert await queue.get() == 1
    result = await asyncio.wait_for(waiting, 1)
    assert result.results == [1] and await queue.get() == 2


async def test_no_fast_path_while_the_flow_is_suspended(consumer: FetchLoopOwner) -> None:
    ran_in: list[asyncio.Task[Any] | None] = []

    async def deliver() -> None:
        ran_in.append(asyncio.current_task())

    consumer.suspend_flow.set()
    await Consumer.wait_first(consumer, deliver(), consumer.suspend_flow.wait())
    assert asyncio.current_task() not in ran_in  # Faust's own race ran it (in a task of its own), if at all


async def test_an_error_in_the_delivery_reaches_the_fetch_loop(consumer: FetchLoopOwner) -> None:
    async def deliver() -> None:
        raise ValueError("decoder broke")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="decoder broke"):
            await Consumer.wait_first(consumer, deliver(), consumer.suspend_flow.wait())


async def test_other_waits_of_the_consumer_keep_mode_s_behaviour(consumer: FetchLoopOwner) -> None:
    ready = Event()
    ready.set()
    result = await Consumer.wait_first(consumer, ready, timeout=1.0)
    assert result.results == [True] and not result.stopped


async def test_resume_hands_a_thrown_error_to_the_coroutine() -> None:
    caught: list[str] = []
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def body() -> str:
        try:
            await never
        except KeyError as exc:
            caught.append(str(exc))
            return "handled"
        return "not reached"

    coroutine = body()
    awaiting = coroutine.send(None)
    task = asyncio.ensure_future(fast_delivery.continued(coroutine, awaiting))
    await asyncio.sleep(0)
    never.set_exception(KeyError("boom"))
    assert await task == "handled" and caught == ["'boom'"]


async def test_the_conductor_waits_for_a_resubscription_that_holds_its_handler_map() -> None:
    fast_delivery.install()
    app = faust.App("conductor-lookup", broker="kafka://127.0.0.1:1", store="memory://")
    conductor: Any = app.topics
    tp = TP("clicks", 0)
    delivered: list[int] = []

    async def handler(message: ConsumerMessage) -> str:
        delivered.append(message.offset)
        return "handled"

    conductor._tp_to_callback[tp] = handler
    record = ConsumerMessage("clicks", 0, 5, 0.0, 0, [], None, b"{}", None, 0, 2, tp)
    assert await conductor.on_message(record) == "handled" and delivered == [5]

    async with conductor._tp_to_callback_lock:  # _update_indices rebuilding the map
        waiting = asyncio.ensure_future(conductor.on_message(record))
        await asyncio.sleep(0.01)
        assert not waiting.done() and delivered == [5]
    assert await asyncio.wait_for(waiting, 1) == "handled" and delivered == [5, 5]


# The fetch loop's direct delivery (drain_messages, deliver_now), on a real Faust app, consumer and conductor
# handler; only the broker fetch (getmany) is replaced by the records under test.

CLICKS = TP("clicks", 0)


def raw_app(name: str, buffer_bytes: int = 1 << 20) -> Any:
    app = faust.App(name, broker="kafka://127.0.0.1:1", store="memory://")
    buffers.install(app, buffer_bytes)
    commit_safety.install()  # as build_app does: the fetch loop then never drops a record by its read offset
    fast_delivery.install()
    app.flow_control.resume()  # as after partitions are assigned
    return app


def record(offset: int, value: bytes = b'{"type": "click"}') -> ConsumerMessage:
    return ConsumerMessage(CLICKS.topic, CLICKS.partition, offset, 0.0, 0, [], b"user-1", value, None, 6, len(value),
                           CLICKS)


class Fetcher(Service):
    """What the fetch loop reads of its fetcher: mode's stopped event."""


def stream_channel(app: Any, **topic_options: Any) -> Any:
    """The channel an agent reads the clicks topic through (what the conductor delivers to)."""
    return aiter(app.topic("clicks", **(topic_options or {"schema": RawBytes()})))


def subscribe(app: Any, *topics: Any) -> ConductorHandler:
    handler = ConductorHandler(app.topics, CLICKS, set(topics))
    app.topics._tp_to_callback[CLICKS] = handler
    return handler


async def drain(app: Any, records: list[ConsumerMessage]) -> list[int]:
    """Run the fetch loop over `records` (one fetch), then stop it. Returns the offsets Faust's delivery path
    (the consumer's callback) was handed; the rest went straight to their queue."""
    consumer = app.consumer
    fetcher = Fetcher()
    through_faust: list[int] = []
    deliver = app.topics.on_message

    async def via_faust(message: ConsumerMessage) -> Any:
        through_faust.append(message.offset)
        return await deliver(message)

    async def getmany(timeout: float) -> AsyncIterator[tuple[TP, ConsumerMessage]]:
        for message in records:
            yield message.tp, message
        fetcher._stopped.set()

    consumer.callback, consumer.getmany = via_faust, getmany
    await asyncio.wait_for(fast_delivery.drain_messages(consumer, fetcher), 5)
    return through_faust


def drained(queue: Any) -> list[int]:
    offsets = []
    while not queue.empty():
        offsets.append(queue.get_nowait().message.offset)
    return offsets


def test_the_pinned_faust_runs_our_fetch_loop() -> None:
    fast_delivery.install()
    assert faust.__version__ == fast_delivery.FETCH_LOOP_COPIED_FROM
    assert fast_delivery.COMPILED_HANDLER is ConductorHandler
    assert Consumer._drain_messages is fast_delivery.drain_messages


def test_another_faust_release_keeps_fausts_fetch_loop(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    fast_delivery.install()
    for owner, name in ((Consumer, "wait_first"), (Conductor, "_compile_message_handler")):
        monkeypatch.setattr(owner, name, getattr(owner, name))  # put back as they are after the test

    async def fausts_loop(self: Any, fetcher: Any) -> None: ...

    monkeypatch.setattr(Consumer, "_drain_messages", fausts_loop)
    monkeypatch.setattr(fast_delivery, "_installed", False)
    monkeypatch.setattr(faust, "__version__", "0.16.0")
    fast_delivery.install()
    assert Consumer._drain_messages is fausts_loop
    assert "faust-streaming 0.16.0" in caplog.text and "Faust's own fetch loop" in caplog.text


async def test_records_of_a_raw_stream_go_straight_to_its_queue_in_order() -> None:
    app = raw_app("direct")
    clicks = stream_channel(app)
    subscribe(app, clicks)
    records = [record(offset) for offset in (7, 8, 9)]
    assert await drain(app, records) == []  # none took Faust's path
    events = [clicks.queue.get_nowait() for _ in records]
    assert [(e.message, e.key, e.value) for e in events] == [(r, r.key, r.value) for r in records]
    assert [r.refcount for r in records] == [1, 1, 1]  # the stream's reference, acknowledged when it is done


async def test_a_full_queue_sends_the_record_through_fausts_delivery_which_waits_for_room() -> None:
    app = raw_app("full", buffer_bytes=64)  # one 100-byte record fills a queue
    clicks = stream_channel(app)
    subscribe(app, clicks)
    big = [record(offset, b"x" * 100) for offset in (1, 2)]
    taken: list[int] = []

    async def stream() -> None:  # the agent, reading after the fetch loop has filled the queue
        await asyncio.sleep(0.05)
        for _ in big:
            taken.append((await clicks.queue.get()).message.offset)

    reader = asyncio.ensure_future(stream())
    assert await drain(app, big) == [2]
    await asyncio.wait_for(reader, 5)
    assert taken == [1, 2]


async def test_while_the_flow_is_suspended_a_record_takes_fausts_path() -> None:
    app = raw_app("suspended")
    clicks = stream_channel(app)
    subscribe(app, clicks)
    app.flow_control.suspend()
    resumed = asyncio.get_running_loop().call_later(0.05, app.flow_control.resume)  # the rebalance ends
    # Faust's handler waited for the flow to resume; the next record found it resumed.
    assert await drain(app, [record(3), record(4)]) == [3]
    resumed.cancel()
    assert drained(clicks.queue) == [3, 4]


async def test_a_partition_read_by_two_streams_or_decoded_by_faust_takes_fausts_path() -> None:
    app = raw_app("two-streams")
    first, second = stream_channel(app), stream_channel(app)
    handler = subscribe(app, first, second)
    message = record(5)
    assert not fast_delivery.deliver_now(handler, message)
    assert (first.queue.qsize(), second.queue.qsize(), message.refcount) == (0, 0, 0)  # nothing done
    assert await drain(app, [message]) == [5]
    assert drained(first.queue) == drained(second.queue) == [5] and message.refcount == 2

    app = raw_app("faust-decoded")
    typed = stream_channel(app, key_type=str, value_type=bytes, key_serializer="raw", value_serializer="raw")
    subscribe(app, typed)
    assert await drain(app, [record(6)]) == [6]
    event = typed.queue.get_nowait()
    assert (event.key, event.message.offset) == ("user-1", 6)


async def test_a_resubscription_in_progress_is_waited_for() -> None:
    app = raw_app("resubscribing")
    clicks = stream_channel(app)
    subscribe(app, clicks)
    lock = app.topics._tp_to_callback_lock
    await lock.acquire()  # _update_indices rebuilding the handler map
    asyncio.get_running_loop().call_later(0.05, lock.release)
    assert await drain(app, [record(12)]) == [12]  # looked up through Faust's path, under the lock
    assert drained(clicks.queue) == [12]
