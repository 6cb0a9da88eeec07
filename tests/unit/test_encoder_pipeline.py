"""The encoder pipeline: batch planning, ordering, the thread hand-off, failures, an event loop that stays live."""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from stream_app.encoding.encoder import Encoded, FakeEncoder
from stream_app.encoding.pipeline import EncoderPipeline, plan_batches


def test_plan_sorts_by_length_and_keeps_padded_tokens_under_budget() -> None:
    counts = [50, 3, 20, 7, 20, 100, 4]
    plan = plan_batches(counts, max_batch_tokens=60, max_batch_size=10)
    flat = [i for batch in plan for i in batch]
    assert sorted(flat) == list(range(len(counts)))  # every text exactly once
    assert [counts[i] for i in flat] == sorted(counts)  # shortest first
    for batch in plan:
        padded = len(batch) * max(counts[i] for i in batch)
        assert padded <= 60 or len(batch) == 1
    assert plan == [[1, 6, 3], [2, 4], [0], [5]]  # 3x7=21, 2x20=40, 50 alone, 100 alone (over budget)


def test_plan_caps_batch_size() -> None:
    plan = plan_batches([5] * 10, max_batch_tokens=10_000, max_batch_size=4)
    assert [len(b) for b in plan] == [4, 4, 2]


def test_plan_gives_every_forward_thread_a_pass_in_every_round() -> None:
    assert plan_batches([5] * 6, max_batch_tokens=10_000, max_batch_size=8, min_batches=2) == [[0, 1, 2], [3, 4, 5]]
    # sorted 1 2 3 4 9: padded 2x2, 2x4, 1x9; halving by count ([2 4] [0] [3 1]) would pad the last to 2x9
    assert plan_batches([3, 9, 1, 4, 2], max_batch_tokens=10_000, max_batch_size=8, min_batches=3) == [
        [2, 4], [0, 3], [1]]
    assert plan_batches([7], max_batch_tokens=100, max_batch_size=8, min_batches=2) == [[0]]  # one text: one pass
    assert plan_batches([], max_batch_tokens=100, max_batch_size=8, min_batches=2) == []
    # Three passes by the size cap become four, so two threads run two full rounds; for one thread the three stand.
    assert plan_batches([5] * 10, max_batch_tokens=10_000, max_batch_size=4, min_batches=2) == [
        [0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert plan_batches([5] * 10, max_batch_tokens=10_000, max_batch_size=4, min_batches=1) == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # already a multiple of the threads: unchanged
    assert plan_batches([5] * 8, max_batch_tokens=10_000, max_batch_size=4, min_batches=2) == [
        [0, 1, 2, 3], [4, 5, 6, 7]]


def _padded(batch: list[int], counts: list[int]) -> int:
    return len(batch) * max(counts[i] for i in batch)


def _least_widest(counts: list[int], parts: int, max_size: int) -> int:
    """By brute force: the smallest possible largest padded size over every split of the sorted texts into
    `parts` runs of at most `max_size` texts."""
    ordered = sorted(counts)
    best = {0: 0}  # texts placed -> least widest so far, for the runs placed
    for _ in range(parts):
        best = {end: min(max(widest, (end - start) * ordered[end - 1]) for start, widest in best.items()
                         if 0 < end - start <= max_size)
                for end in range(1, len(ordered) + 1) if any(0 < end - start <= max_size for start in best)}
    return best[len(ordered)]


def test_plan_evens_out_the_passes_a_micro_batch_is_cut_into() -> None:
    # Filled one after the other, 39 short texts and one long fill a pass to 390 and leave 100 for the other,
    # two passes at once then wait on the first; evened out, the widest is 370.
    counts = [10] * 39 + [100]
    plan = plan_batches(counts, max_batch_tokens=400, max_batch_size=128, min_batches=2)
    assert [_padded(b, counts) for b in plan] == [370, 300]
    rng = random.Random(11)
    for _ in range(300):
        counts = [rng.randint(1, 60) for _ in range(rng.randint(1, 12))]
        budget, max_size, threads = rng.randint(60, 300), rng.randint(1, 6), rng.randint(1, 4)
        plan = plan_batches(counts, max_batch_tokens=budget, max_batch_size=max_size, min_batches=threads)
        flat = [i for batch in plan for i in batch]
        assert sorted(flat) == list(range(len(counts))) and [counts[i] for i in flat] == sorted(counts)
        filled = plan_batches(counts, max_batch_tokens=budget, max_batch_size=max_size)  # no thread to feed
        assert len(plan) == min(len(counts), math.ceil(max(len(filled), threads) / threads) * threads)
        assert all(len(b) <= max_size and (_padded(b, counts) <= budget or len(b) == 1) for b in plan)
        assert max(_padded(b, counts) for b in plan) == _least_widest(counts, len(plan), max_size)


@pytest.fixture
def pipeline() -> Any:
    running = EncoderPipeline(FakeEncoder(), max_batch_tokens=64, max_batch_size=8).start()
    yield running
    running.stop()


async def test_results_come_back_in_input_order(pipeline: EncoderPipeline) -> None:
    texts = ["a much longer review text that is good", "bad", "x" * 40, "short good", "", "mid length text here"]
    results = await pipeline.encode(texts)
    assert results == FakeEncoder().forward(FakeEncoder().tokenize(texts))
    assert [r.sentiment for r in results] == [0.5, -0.5, 0.0, 0.5, 0.0, 0.0]


async def test_batches_respect_the_token_budget(pipeline: EncoderPipeline) -> None:
    encoder = pipeline.encoder
    assert isinstance(encoder, FakeEncoder)
    await pipeline.encode(["y" * n for n in (30, 2, 31, 5, 9, 64, 1, 12)])
    assert encoder.forward_calls  # (texts, padded tokens) per forward pass
    assert all(padded <= 64 for _, padded in encoder.forward_calls)
    assert sum(texts for texts, _ in encoder.forward_calls) == 8
    assert pipeline.stats.forward_passes == len(encoder.forward_calls)


class SlowEncoder(FakeEncoder):
    """Holds the GIL-free forward for a while, recording the thread it ran on."""

    def __init__(self, delay_s: float, fail_on: str | None = None) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.threads: set[str] = set()

    def forward(self, inputs: list[list[int]]) -> list[Encoded]:
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay_s)
        if self.fail_on is not None and any(bytes(ids).decode() == self.fail_on for ids in inputs):
            raise ValueError("poisoned text")
        return super().forward(inputs)


class GatedEncoder(FakeEncoder):
    """A forward pass that lasts until the event loop opens its gate: only a free loop can end it."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.threads: set[str] = set()

    def forward(self, inputs: list[list[int]]) -> list[Encoded]:
        self.threads.add(threading.current_thread().name)
        self.entered.set()
        if not self.gate.wait(timeout=60):
            raise TimeoutError("the event loop never opened the gate: it was blocked by the forward pass")
        return super().forward(inputs)


async def test_forward_runs_off_the_event_loop_which_stays_responsive() -> None:
    # No clock involved: if the forward pass ran on the event loop, the loop could not open the gate.
    encoder = GatedEncoder()
    pipeline = EncoderPipeline(encoder, max_batch_tokens=8, max_batch_size=1).start()
    try:
        encoding = asyncio.ensure_future(pipeline.encode(["one"]))
        while not encoder.entered.is_set():
            await asyncio.sleep(0.005)
        assert not encoding.done()  # the forward pass is under way, and the loop runs on meanwhile
        encoder.gate.set()
        results = await encoding
    finally:
        pipeline.stop()
    assert [r.embedding for r in results] == [FakeEncoder().forward(FakeEncoder().tokenize(["one"]))[0].embedding]
    assert encoder.threads == {"encoder-forward-0"}


class PairedEncoder(FakeEncoder):
    """Two passes at once or none: each forward pass waits at a barrier until a second pass is inside too."""

    def __init__(self, concurrent_passes: int, alone_s: float = 10.0) -> None:
        super().__init__()
        self.concurrent_passes = concurrent_passes
        self.barrier = threading.Barrier(2, timeout=alone_s)
        self.threads: set[str] = set()
        self.finished: list[str] = []

    def forward(self, inputs: list[list[int]]) -> list[Encoded]:
        self.threads.add(threading.current_thread().name)
        self.barrier.wait()  # BrokenBarrierError after alone_s: the passes ran one after the other
        text = bytes(inputs[0]).decode()
        if text == "first":  # finish after the pass beside it, so the job's results arrive out of order
            time.sleep(0.2)
        self.finished.append(text)
        return super().forward(inputs)


async def test_an_encoder_that_allows_two_passes_at_once_gets_two_forward_threads() -> None:
    encoder = PairedEncoder(concurrent_passes=2)
    pipeline = EncoderPipeline(encoder, max_batch_tokens=1000, max_batch_size=1).start()
    try:
        texts = ["first", "second!"]  # one pass each, "first" planned first (shorter)
        results = await asyncio.wait_for(pipeline.encode(texts), timeout=30)
    finally:
        pipeline.stop()
    assert encoder.threads == {"encoder-forward-0", "encoder-forward-1"}
    assert encoder.finished == ["second!", "first"]
    assert results == FakeEncoder().forward(FakeEncoder().tokenize(texts))  # input order all the same
    assert pipeline.stats.forward_passes == 2 and pipeline.stats.texts == 2
    assert not pipeline.running  # stop() ended every forward thread


async def test_one_forward_thread_when_the_encoder_allows_one_pass_at_a_time() -> None:
    encoder = PairedEncoder(concurrent_passes=1, alone_s=0.5)
    pipeline = EncoderPipeline(encoder, max_batch_tokens=1000, max_batch_size=1).start()
    try:
        with pytest.raises(threading.BrokenBarrierError):
            await asyncio.wait_for(pipeline.encode(["first", "second!"]), timeout=30)
    finally:
        pipeline.stop()
    assert encoder.threads == {"encoder-forward-0"}


async def test_a_failing_batch_raises_to_the_caller_and_the_pipeline_keeps_serving() -> None:
    pipeline = EncoderPipeline(SlowEncoder(0.0, fail_on="poison"), max_batch_tokens=1000, max_batch_size=8).start()
    try:
        with pytest.raises(ValueError, match="poisoned text"):
            await pipeline.encode(["fine", "poison"])
        assert [r.sentiment for r in await pipeline.encode(["good"])] == [0.5]
    finally:
        pipeline.stop()


async def test_concurrent_callers_get_their_own_results(pipeline: EncoderPipeline) -> None:
    batches: list[Sequence[str]] = [[f"caller {c} text {i}" for i in range(c + 1)] for c in range(6)]
    answers = await asyncio.gather(*(pipeline.encode(b) for b in batches))
    fake = FakeEncoder()
    for batch, answer in zip(batches, answers, strict=True):
        assert answer == fake.forward(fake.tokenize(batch))


async def test_empty_input_and_stopped_pipeline() -> None:
    pipeline = EncoderPipeline(FakeEncoder(), max_batch_tokens=64, max_batch_size=8)
    assert await pipeline.encode([]) == []
    with pytest.raises(RuntimeError, match="not running"):
        await pipeline.encode(["x"])
