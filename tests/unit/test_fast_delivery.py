"""The fetch loop's delivery race, without tasks when nothing blocks (stream_app/worker/fast_delivery.py)."""

from __future__ import annotations

import asyncio
import warnings
from typing import Any

import pytest
from faust.transport.consumer import Consumer
from mode import Service
from mode.utils.locks import Event

from stream_app.worker import fast_delivery


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
    import faust
    from faust.transport.consumer import ConsumerMessage
    from faust.types import TP

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
