"""Stream buffers bounded by bytes as well as by count.

Faust buffers each agent's input in a queue of `stream_buffer_maxsize` messages (4 x `PROFILE_BATCH_MAX`, 20,000),
whatever their size, and the table manager buffers changelog records the same way. Small events never come near
any size that matters, but records near `PROFILE_MAX_EVENT_BYTES` do: a flood of 30,000 bad 60 KB click records
took a worker from 488 to 1,245 MB of RSS (2-core EPYC, docs/hostile-input.md), past a 1 GiB container limit, and
the restarted worker would meet the same backlog. So every such queue of the worker also stops taking records
once those it holds reach `PROFILE_BUFFER_MAX_BYTES` of keys and values; the fetch loop then waits, as it does for
a queue full by count. An empty queue always takes one record, however large, so nothing can wedge the worker.
"""

from __future__ import annotations

from typing import Any

from mode.utils.queues import ThrowableQueue


def record_bytes(item: Any) -> int:
    """Key and value bytes of the Kafka record behind a queued Faust event (0 for anything else). Called three
    times per event (put, get, batch), so no more than two attribute reads on the usual path."""
    try:
        message = item.message
        key, value = message.key, message.value
    except AttributeError:
        return 0
    return (len(key) if isinstance(key, bytes) else 0) + (len(value) if isinstance(value, bytes) else 0)


class ByteBoundedQueue(ThrowableQueue[Any]):
    """Faust's stream queue (`ThrowableQueue`) that is also full at `max_bytes` of records."""

    def __init__(self, *args: Any, max_bytes: int, **kwargs: Any) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        self.max_bytes = max_bytes
        self.held_bytes = 0
        super().__init__(*args, **kwargs)

    def full(self) -> bool:
        # Faust's delivery asks `full()` before `put_nowait_enhanced` and otherwise awaits `put`, which waits while
        # `full()`; every get wakes a waiting put, which asks again.
        return super().full() or (self.held_bytes >= self.max_bytes and self.qsize() > 0)

    def _put(self, item: Any) -> None:
        super()._put(item)
        self.held_bytes += record_bytes(item)

    def _get(self) -> Any:
        item = super()._get()
        self.held_bytes -= record_bytes(item)
        return item

    def clear(self) -> None:
        super().clear()
        self.held_bytes = 0


def install(app: Any, max_bytes: int) -> None:
    """Every stream buffer `app` creates from now on (agents' channels, streams' outboxes, the changelog buffer)
    is a `ByteBoundedQueue` of `max_bytes`."""

    def flow_control_queue(maxsize: int | None = None, *, clear_on_resume: bool = False) -> ByteBoundedQueue:
        return ByteBoundedQueue(maxsize=maxsize or 0, flow_control=app.flow_control, clear_on_resume=clear_on_resume,
                                max_bytes=max_bytes)

    app.FlowControlQueue = flow_control_queue
