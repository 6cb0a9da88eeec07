"""take_batches: Faust's take_events semantics (sizes, window, acknowledgement after the batch, rebalance drops),
read straight from the agent's channel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from faust.events import Event
from faust.types import TP, EventT
from faust.types.tuples import ConsumerMessage

from stream_app.encoding.encoder import FakeEncoder
from stream_app.ops.settings import Settings
from stream_app.worker.app import WorkerApp, build_worker
from stream_app.worker.batches import take_batches

TOPIC = "clicks"


@pytest.fixture
def worker() -> Iterator[WorkerApp]:
    built = build_worker(Settings(), encoder=FakeEncoder())
    built.app.flow_control.resume()  # as the running worker's, between rebalances
    yield built
    built.encoder.stop()


class Feed:
    """A stream of the worker's app whose channel we fill with events as the conductor delivers them (one
    reference per subscribed stream)."""

    def __init__(self, worker: WorkerApp, acking: bool = True) -> None:
        self.app = worker.app
        self.stream = self.app.stream(self.app.channel())
        self.queue = aiter(self.stream.channel).queue
        if acking:
            self.app.topics._acking_topics.add(TOPIC)
        self.offset = 0

    def put(self, count: int, generation: int | None = None, partition: int = 0,
            queue: bool = True) -> list[ConsumerMessage]:
        messages = []
        for _ in range(count):
            message = ConsumerMessage(TOPIC, partition, self.offset, 0.0, 0, [], b"u1", f"v{self.offset}".encode(),
                                      None, generation_id=self.app.consumer_generation_id if generation is None
                                      else generation)
            message.incref()
            if queue:
                self.queue.put_nowait(Event(self.app, message.key, message.value, {}, message))
            messages.append(message)
            self.offset += 1
        return messages

    def batches(self, max_: int = 3, within: float = 0.05) -> AsyncIterator[list[EventT]]:
        return take_batches(self.stream, max_, within)


def values(batch: list[EventT]) -> list[bytes]:
    return [event.value for event in batch]


async def test_batches_hold_at_most_max_events_in_order_and_a_short_one_leaves_after_the_window(
    worker: WorkerApp,
) -> None:
    feed = Feed(worker)
    feed.put(7)
    batches = feed.batches(max_=3, within=0.05)
    assert values(await anext(batches)) == [b"v0", b"v1", b"v2"]
    assert values(await anext(batches)) == [b"v3", b"v4", b"v5"]
    assert values(await asyncio.wait_for(anext(batches), timeout=10)) == [b"v6"]
    feed.put(1)  # arrives while the window of the next batch is open
    assert values(await asyncio.wait_for(anext(batches), timeout=10)) == [b"v7"]
    await batches.aclose()


async def test_an_idle_agent_sets_no_timer_and_its_next_batch_still_waits_out_the_window(
    worker: WorkerApp, monkeypatch: pytest.MonkeyPatch,
) -> None:
    timers = 0
    real_timeout = asyncio.timeout

    def counted(delay: float | None) -> asyncio.Timeout:
        nonlocal timers
        timers += 1
        return real_timeout(delay)

    monkeypatch.setattr("stream_app.worker.batches.asyncio.timeout", counted)
    feed = Feed(worker)
    batches = feed.batches(max_=3, within=0.02)
    waiting = asyncio.ensure_future(anext(batches))
    # Fifteen and a half windows with nothing to take. Not a whole number of them: the event would then arrive
    # within microseconds of a window's end, and the batch could leave before the test looks.
    await asyncio.sleep(0.31)
    assert not waiting.done() and timers == 0
    feed.put(1)
    await asyncio.sleep(0)  # the first event is taken, its window is open
    assert not waiting.done()
    feed.put(1)  # arrives within the same window: leaves with the first
    assert values(await asyncio.wait_for(waiting, timeout=10)) == [b"v0", b"v1"]
    assert timers >= 1  # the open window is timed
    await batches.aclose()


async def test_a_batch_is_acknowledged_only_when_the_agent_asks_for_the_next_one(worker: WorkerApp) -> None:
    feed = Feed(worker)
    consumer = worker.app.consumer
    first = feed.put(3)
    batches = feed.batches(max_=3)
    await anext(batches)
    assert all(m.tracked and not m.acked and m.refcount == 1 for m in first)
    assert all(m in consumer._unacked_messages for m in first)  # what wait_empty waits for on a rebalance
    feed.put(3)
    await anext(batches)
    assert all(m.acked and m.refcount == 0 for m in first)
    assert not any(m in consumer._unacked_messages for m in first)
    assert list(consumer._acked[TP(TOPIC, 0)]) == [0, 1, 2]  # committable
    await batches.aclose()


async def test_acknowledging_a_batch_leaves_the_consumer_as_faust_s_own_stream_ack_does(worker: WorkerApp) -> None:
    feed = Feed(worker)
    consumer = worker.app.consumer
    ours = feed.put(4, partition=0)
    ours[1].incref()  # a second stream still holds this one
    feed.offset = 0
    theirs = feed.put(4, partition=1, queue=False)
    theirs[1].incref()
    batches = feed.batches(max_=4)
    await anext(batches)
    for message in theirs:  # what take_events does: tracked on the way in, Stream.ack after the batch
        message.tracked = True
        consumer.track_message(message)
        await feed.stream.ack(Event(worker.app, message.key, message.value, {}, message))
    feed.put(1)
    await anext(batches)  # acknowledges ours
    assert [(m.acked, m.refcount) for m in ours] == [(m.acked, m.refcount) for m in theirs] == [
        (True, 0), (False, 1), (True, 0), (True, 0)]
    assert list(consumer._acked[TP(TOPIC, 0)]) == list(consumer._acked[TP(TOPIC, 1)]) == [0, 2, 3]
    assert [m in consumer._unacked_messages for m in ours] == [m in consumer._unacked_messages for m in theirs] == [
        False, True, False, False]
    await batches.aclose()


async def test_a_batch_whose_processing_failed_is_never_acknowledged(worker: WorkerApp) -> None:
    feed = Feed(worker)
    taken = feed.put(2)
    batches = feed.batches(max_=2)
    await anext(batches)
    with pytest.raises(RuntimeError, match="send failed"):
        await batches.athrow(RuntimeError("send failed"))
    assert not any(m.acked for m in taken) and all(m.refcount == 1 for m in taken)
    assert all(m in worker.app.consumer._unacked_messages for m in taken)


async def test_events_of_an_older_generation_or_taken_during_a_rebalance_are_dropped_unacknowledged(
    worker: WorkerApp,
) -> None:
    feed = Feed(worker)
    stale = feed.put(2, generation=worker.app.consumer_generation_id - 1)
    fresh = feed.put(1)
    batches = feed.batches(max_=3, within=0.05)
    assert values(await asyncio.wait_for(anext(batches), timeout=10)) == [b"v2"]
    assert not any(m.acked or m.tracked for m in stale)

    worker.app.flow_control.suspend()
    during = feed.put(2)
    waiting = asyncio.ensure_future(anext(batches))
    await asyncio.sleep(0.2)  # several windows: nothing is taken while the flow is suspended
    assert not waiting.done() and not any(m.tracked for m in during)
    worker.app.flow_control.resume()
    after = feed.put(1)
    assert values(await asyncio.wait_for(waiting, timeout=10)) == [b"v5"]
    assert fresh[0].acked and not after[0].acked
    await batches.aclose()


async def test_non_acking_topics_are_not_tracked_and_the_end_of_the_channel_ends_the_batches(
    worker: WorkerApp,
) -> None:
    feed = Feed(worker, acking=False)
    taken = feed.put(2)
    batches = feed.batches(max_=5, within=0.05)
    assert values(await asyncio.wait_for(anext(batches), timeout=10)) == [b"v0", b"v1"]
    last = feed.put(1)
    waiting = asyncio.ensure_future(anext(batches))
    await asyncio.sleep(0)  # it takes v2, then waits for more inside the window
    feed.queue._throw(StopAsyncIteration())  # how a channel ends (a test context stopping)
    assert values(await asyncio.wait_for(waiting, timeout=10)) == [b"v2"]  # what was taken still goes out
    with pytest.raises(StopAsyncIteration):
        await anext(batches)
    assert not any(m.tracked for m in taken + last) and all(m.acked for m in taken + last)


@pytest.mark.parametrize(("max_", "within", "max_bytes"), [(0, 0.05, None), (5, 0.0, None), (5, 0.05, 0)])
async def test_a_batch_size_below_one_a_window_of_zero_or_a_byte_budget_of_zero_is_refused(
    worker: WorkerApp, max_: int, within: float, max_bytes: int | None
) -> None:
    with pytest.raises(ValueError, match="max_ >= 1, within > 0 and max_bytes >= 1"):
        await anext(take_batches(Feed(worker).stream, max_, within, max_bytes))


async def test_a_batch_also_leaves_at_its_byte_budget_and_a_record_over_it_goes_alone(worker: WorkerApp) -> None:
    feed = Feed(worker)
    sizes = [400, 400, 400, 2000, 100, 100]  # values; every key is b"u1"
    for size in sizes:
        message = ConsumerMessage(TOPIC, 0, feed.offset, 0.0, 0, [], b"u1", b"x" * size, None,
                                  generation_id=worker.app.consumer_generation_id)
        message.incref()
        feed.queue.put_nowait(Event(worker.app, message.key, message.value, {}, message))
        feed.offset += 1
    batches = take_batches(feed.stream, 100, 0.05, max_bytes=1000)
    lengths = [[len(e.value) for e in await asyncio.wait_for(anext(batches), timeout=10)] for _ in range(3)]
    # 402 + 402 = 804 < 1000, the third crosses it and is the last in; 2,002 alone; the rest after the window.
    assert lengths == [[400, 400, 400], [2000], [100, 100]]
    await batches.aclose()


async def test_the_agents_stream_buffers_are_bounded_by_the_byte_setting(worker: WorkerApp) -> None:
    from stream_app.worker.buffers import ByteBoundedQueue

    queue = Feed(worker).queue
    assert isinstance(queue, ByteBoundedQueue)
    assert queue.max_bytes == worker.settings.buffer_max_bytes == 16 * 1024 * 1024
    assert queue.maxsize == 4 * worker.settings.batch_max  # the count limit stays

