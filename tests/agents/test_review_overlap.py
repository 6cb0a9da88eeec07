"""The review agent overlaps micro-batches: batch n+1 encodes while batch n is sent and confirmed.

What must hold meanwhile: an input offset becomes committable only once its batch's sends are confirmed,
batches are sent in input order, and a failed send still fails the agent. In `test_context` no conductor
holds a reference on the messages, so `conducted` takes the one Faust's conductor takes for a subscribed stream;
without it `take_events` acknowledging an event would make it final at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest.mock import patch

import orjson

from stream_app.encoding.encoder import Encoded, FakeEncoder
from stream_app.ops.settings import Settings
from stream_app.worker.app import WorkerApp, build_worker
from tests.agents.test_agents import SendRejected, review, until


class RecordingEncoder(FakeEncoder):
    """Records the texts of every forward pass (from the forward thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.texts: list[str] = []

    def forward(self, inputs: list[list[int]]) -> list[Encoded]:
        with self.lock:
            self.texts.extend(bytes(ids).decode() for ids in inputs)
        return super().forward(inputs)


def make_worker(encoder: FakeEncoder, **settings: Any) -> WorkerApp:
    return build_worker(Settings(**settings), encoder=encoder)


class Broker:
    """The producer's sends; each stays unacknowledged until the test confirms it."""

    def __init__(self) -> None:
        self.sends: list[tuple[str, bytes, asyncio.Future[None]]] = []

    async def send(self, topic: str, _key: Any, value: bytes, *_args: Any, **_kwargs: Any) -> asyncio.Future[None]:
        self.sends.append((topic, value, asyncio.get_running_loop().create_future()))
        return self.sends[-1][2]

    def event_ids(self, index: int) -> list[str]:
        from stream_app.core.fold import decode_bundle

        return [e.event_id for e in decode_bundle(self.sends[index][1])]


@contextmanager
def conducted(agent: Any, messages: list[Any]) -> Iterator[None]:
    """Each message put to the test agent carries the reference the conductor would hold for its stream."""
    original = agent.to_message

    def to_message(*args: Any, **kwargs: Any) -> Any:
        message = original(*args, **kwargs)
        message.incref()
        messages.append(message)
        return message

    with patch.object(agent, "to_message", side_effect=to_message):
        yield


async def test_the_next_batch_encodes_while_the_previous_one_waits_for_its_confirmation() -> None:
    encoder = RecordingEncoder()
    worker = make_worker(encoder, review_batch_max=2, review_batch_within_s=3600.0)
    broker = Broker()
    messages: list[Any] = []
    with patch.object(worker.app.producer, "send", side_effect=broker.send):
        async with worker.agents["encode_reviews"].test_context() as agent:
            with conducted(agent, messages):
                for index in range(4):
                    await agent.put(review(index), key=b"u1", wait=False)
                await until(lambda: broker.sends)  # batch 1 sent, not confirmed
                # Batch 2 is taken and encoded although batch 1 still waits for the broker.
                await until(lambda: len(encoder.texts) == 4, timeout_s=5.0)
                await asyncio.sleep(0.05)
                assert len(broker.sends) == 1 and broker.event_ids(0) == ["r0", "r1"]
                # take_events has moved on past batch 1, yet its offsets are not committable before the broker
                # stored its enriched events.
                assert [m.acked for m in messages] == [False] * 4
                broker.sends[0][2].set_result(None)
                await until(lambda: messages[0].acked and messages[1].acked)
                await until(lambda: len(broker.sends) == 2)  # batch 2 only after batch 1's confirmation
                assert broker.event_ids(1) == ["r2", "r3"]
                await asyncio.sleep(0.05)
                assert not messages[2].acked and not messages[3].acked
            # Stopped with batch 2 unconfirmed: its messages stay unacknowledged (they come again).
    worker.encoder.stop()
    assert [m.acked for m in messages] == [True, True, False, False]


async def test_no_more_than_two_batches_are_taken_before_the_first_is_confirmed() -> None:
    encoder = RecordingEncoder()
    worker = make_worker(encoder, review_batch_max=2, review_batch_within_s=3600.0)
    broker = Broker()
    with patch.object(worker.app.producer, "send", side_effect=broker.send):
        async with worker.agents["encode_reviews"].test_context() as agent:
            for index in range(8):
                await agent.put(review(index), key=b"u1", wait=False)
            await until(lambda: broker.sends and len(encoder.texts) == 4)
            await asyncio.sleep(0.3)
            assert len(encoder.texts) == 4  # batch 3 waits for a free slot: memory stays bounded
            broker.sends[0][2].set_result(None)
            await until(lambda: len(encoder.texts) == 6)
    worker.encoder.stop()


class SlowFirstEncoder(RecordingEncoder):
    """The first forward pass takes a while, the later ones do not."""

    def forward(self, inputs: list[list[int]]) -> list[Encoded]:
        if not self.texts:
            threading.Event().wait(0.3)
        return super().forward(inputs)


async def test_each_users_reviews_are_sent_in_input_order() -> None:
    encoder = SlowFirstEncoder()
    worker = make_worker(encoder, review_batch_max=3, review_batch_within_s=0.05)
    sent: list[str] = []

    async def send(_topic: str, _key: Any, value: bytes, *_args: Any, **_kwargs: Any) -> asyncio.Future[None]:
        from stream_app.core.fold import decode_bundle

        sent.extend(e.event_id for e in decode_bundle(value))
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def event(index: int) -> bytes:
        return orjson.dumps({"event_id": f"r{index}", "user_id": f"u{index % 2}", "ts": 100 + index,
                             "type": "review", "item_id": "i", "text": f"review number {index}"})

    with patch.object(worker.app.producer, "send", side_effect=send):
        async with worker.agents["encode_reviews"].test_context() as agent:
            for index in range(20):
                await agent.put(event(index), key=f"u{index % 2}".encode(), wait=False)
            await until(lambda: len(sent) == 20)
    worker.encoder.stop()
    for user in (0, 1):  # one bundle per partition and batch: the order that holds is the order per user
        assert [e for e in sent if int(e[1:]) % 2 == user] == [f"r{index}" for index in range(user, 20, 2)]


async def test_a_failed_send_fails_the_agent_and_releases_nothing_in_flight(exits: list[int]) -> None:
    encoder = RecordingEncoder()
    worker = make_worker(encoder, review_batch_max=2, review_batch_within_s=3600.0)
    broker = Broker()
    errors: list[BaseException] = []
    done: list[int] = []
    messages: list[Any] = []

    async def on_error(_agent: Any, exc: BaseException) -> None:
        errors.append(exc)

    async def count(value: int) -> None:
        done.append(value)

    agent = worker.agents["encode_reviews"]
    agent.add_sink(count)
    with patch.object(worker.app.producer, "send", side_effect=broker.send):
        async with agent.test_context(on_error=on_error) as running:
            with conducted(running, messages):
                for index in range(4):
                    await running.put(review(index), key=b"u1", wait=False)
                await until(lambda: broker.sends and len(encoder.texts) == 4)
                broker.sends[0][2].set_exception(SendRejected("MessageSizeTooLarge"))
                await until(lambda: errors)
    worker.encoder.stop()
    assert [type(exc) for exc in errors] == [SendRejected]
    assert done == [] and exits == [70]
    assert not any(m.acked for m in messages)  # nothing committable: all four come again



async def test_a_failure_while_admitting_or_encoding_ahead_fails_the_agent(exits: list[int]) -> None:
    # Admission and encoding run in a task of their own; what they raise must still crash the agent.
    worker = make_worker(RecordingEncoder(), review_batch_max=2, review_batch_within_s=3600.0)
    errors: list[BaseException] = []

    async def on_error(_agent: Any, exc: BaseException) -> None:
        errors.append(exc)

    async def admit(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("admission broke")

    with patch("agents.reviews.admit", side_effect=admit), \
         patch.object(worker.app.producer, "send", side_effect=Broker().send):
        async with worker.agents["encode_reviews"].test_context(on_error=on_error) as agent:
            for index in range(2):
                await agent.put(review(index), key=b"u1", wait=False)
            await until(lambda: errors)
    worker.encoder.stop()
    assert [str(exc) for exc in errors] == ["admission broke"]
    assert exits == [70]
