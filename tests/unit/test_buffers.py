"""ByteBoundedQueue: Faust's stream queue, also full at a byte budget of the records it holds."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from mode.utils.queues import FlowControlEvent

from stream_app.worker.buffers import ByteBoundedQueue, record_bytes


def record(value_bytes: int, key: bytes = b"user") -> Any:
    """What Faust queues: an event whose message holds the record's raw key and value."""
    return SimpleNamespace(message=SimpleNamespace(key=key, value=b"x" * value_bytes))


def queue(max_bytes: int, maxsize: int = 100) -> ByteBoundedQueue:
    flow_control = FlowControlEvent()
    flow_control.resume()
    return ByteBoundedQueue(maxsize=maxsize, flow_control=flow_control, max_bytes=max_bytes)


def test_record_bytes_counts_key_and_value_and_nothing_else() -> None:
    assert record_bytes(record(100, key=b"abc")) == 103
    assert record_bytes(SimpleNamespace(message=SimpleNamespace(key=None, value=None))) == 0
    assert record_bytes("not an event") == 0


def test_full_at_the_byte_budget_before_the_count_and_not_full_again_after_a_get() -> None:
    q = queue(max_bytes=1000)
    for _ in range(3):
        assert not q.full()
        q.put_nowait(record(296))  # 300 bytes with the key
    assert q.held_bytes == 900 and not q.full()
    q.put_nowait(record(296))
    assert q.held_bytes == 1200 and q.full() and q.qsize() == 4
    with pytest.raises(asyncio.QueueFull):
        q.put_nowait(record(0))
    q.get_nowait()
    assert q.held_bytes == 900 and not q.full()


def test_the_count_limit_still_holds_for_small_records() -> None:
    q = queue(max_bytes=1_000_000, maxsize=3)
    for _ in range(3):
        q.put_nowait(record(1))
    assert q.full() and q.held_bytes == 15


def test_an_empty_queue_takes_one_record_larger_than_the_budget() -> None:
    q = queue(max_bytes=1000)
    assert not q.full()
    q.put_nowait(record(5000))
    assert q.full()
    q.get_nowait()
    assert q.held_bytes == 0 and not q.full()


async def test_a_put_waiting_on_a_byte_full_queue_goes_in_when_a_get_frees_room() -> None:
    q = queue(max_bytes=1000)
    q.put_nowait(record(996))
    waiting = asyncio.ensure_future(q.put(record(496)))
    await asyncio.sleep(0.01)
    assert not waiting.done() and q.qsize() == 1
    q.get_nowait()
    await asyncio.wait_for(waiting, timeout=5)
    assert q.qsize() == 1 and q.held_bytes == 500


def test_clear_and_the_faust_forced_put_keep_the_count_of_bytes() -> None:
    q = queue(max_bytes=1000)
    q.force_put_nowait(record(96))
    q.put_nowait_enhanced(record(96), on_pressure_high=lambda: None, on_pressure_drop=lambda: None)
    assert q.held_bytes == 200
    q.clear()
    assert q.held_bytes == 0 and q.qsize() == 0


def test_a_budget_below_one_byte_is_refused() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        queue(max_bytes=0)
