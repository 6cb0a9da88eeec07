"""Runs a `TextEncoder` off the event loop: a tokenizer thread and forward threads, bounded queues between.

Why separate threads: the forward pass is the bottleneck, so the tokenizer thread prepares (tokenises, sorts,
pads) batch n+1 while the forward threads run the batches before it; torch and the Rust tokenizer release the
GIL, so the event loop keeps serving Kafka heartbeats and fetches meanwhile. One forward thread per pass the
encoder runs at once (`concurrent_passes`: 2 on a CPU with 2+ cores by default, 1 on CUDA). Why bounded queues:
a worker that cannot keep up must push back on its input, not buffer reviews without limit.

Inside one call to `encode`, texts are sorted by token count and cut into forward batches whose padded size
(texts x longest) stays under a token budget: similar lengths waste little padding (measured +30-35% on
CPU), and the budget bounds activation memory whatever the texts. Results come back in input order.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from stream_app.encoding.encoder import Encoded, TextEncoder
from stream_app.ops import metrics

log = logging.getLogger(__name__)


def plan_batches(token_counts: Sequence[int], *, max_batch_tokens: int, max_batch_size: int,
                 padded_shape: Callable[[int, int], tuple[int, int]] | None = None,
                 min_batches: int = 1) -> list[list[int]]:
    """Indices of the texts grouped into forward batches, shortest first, their padded sizes evened out.

    A batch's padded size is `padded_shape(len(batch), its longest text)` (default: exactly that) multiplied
    out; it stays <= max_batch_tokens unless a single text is longer than the budget on its own (then that
    text is a batch by itself: truncation to the model's max length already bounds it).

    As few batches as the budget and max_batch_size allow, rounded up to a multiple of `min_batches` (the forward
    threads; while there are texts to split), so that every forward thread has a pass in every round, a small
    micro-batch included. Within that number, the widest padded size is as small as it can be. Filling each batch
    to the budget in turn left the leftovers to the last, and passes that run side by side are done only when
    the widest is: on a 2-core AMD EPYC (fp32) a worker that fell behind at 17 reviews/s had one forward thread
    busy ~80 % of the time and the other ~30 %, and stayed ~9 s behind for minutes at half its capacity.
    """
    shape = padded_shape or _exact_shape
    order = sorted(range(len(token_counts)), key=lambda i: (token_counts[i], i))
    if not order:
        return []

    def pack(capacity: int) -> list[list[int]]:
        batches: list[list[int]] = []
        current: list[int] = []
        for index in order:
            longest = token_counts[index]  # ascending order: the newcomer is the longest
            full = len(current) >= max_batch_size or math.prod(shape(len(current) + 1, longest)) > capacity
            if current and full:
                batches.append(current)
                current = []
            current.append(index)
        batches.append(current)
        return batches

    batches = pack(max_batch_tokens)
    # A multiple of the forward threads: three passes on two threads run as two rounds, the second with one thread
    # idle; four narrower passes fill both rounds (a micro-batch alone: 7.3 -> 5.1 s, 2-core EPYC, fp32).
    threads = max(1, min_batches)
    wanted = min(len(order), math.ceil(max(len(batches), threads) / threads) * threads)
    # The batches a capacity packs into only get fewer as it grows (a text over it still gets a batch of its own):
    # bisect for the smallest capacity that packs into `wanted`, keeping its packing. The budget itself always does.
    low, high = 1, max_batch_tokens
    while low < high:
        middle = (low + high) // 2
        packed = pack(middle)
        if len(packed) <= wanted:
            high, batches = middle, packed
        else:
            low = middle + 1
    while len(batches) < wanted:  # padded shapes that round alike can leave one short: halve the widest
        widest = max(range(len(batches)), key=lambda b: len(batches[b]))
        if len(batches[widest]) < 2:
            break
        half = len(batches[widest]) // 2
        batches[widest : widest + 1] = [batches[widest][:half], batches[widest][half:]]
    return batches


def _exact_shape(rows: int, longest: int) -> tuple[int, int]:
    return rows, longest


@dataclass
class PipelineStats:
    texts: int = 0
    forward_passes: int = 0
    padded_tokens: int = 0
    forward_seconds: float = 0.0


@dataclass(eq=False)
class _Job:
    texts: list[str]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[Encoded]]
    results: list[Encoded | None] = field(default_factory=list)
    pending: int = 0
    failed: bool = False

    def resolve(self) -> None:
        self._settle(lambda: self.future.set_result([r for r in self.results if r is not None]))

    def fail(self, exc: BaseException) -> None:
        self.failed = True
        self._settle(lambda: self.future.set_exception(exc))

    def _settle(self, action: Any) -> None:
        def settle() -> None:
            if not self.future.done():
                action()

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is gone (worker shutting down): nobody waits for the answer
            pass


@dataclass(eq=False)
class _Batch:
    job: _Job
    indices: list[int]
    inputs: Any
    padded_tokens: int


class EncoderPipeline:
    def __init__(self, encoder: TextEncoder, *, max_batch_tokens: int, max_batch_size: int,
                 queue_depth: int = 2) -> None:
        self.encoder = encoder
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.queue_depth = queue_depth
        self.forward_threads = max(1, encoder.concurrent_passes)
        self.stats = PipelineStats()
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_depth)
        # Enough collated batches waiting that no forward thread idles while the tokenizer works on the next.
        self._batches: queue.Queue[_Batch | None] = queue.Queue(maxsize=max(queue_depth, self.forward_threads))
        # Forward threads finish batches of one job in any order: results, countdown and stats change under it.
        self._done = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._slots: asyncio.Semaphore | None = None

    def start(self) -> EncoderPipeline:
        self._threads = [threading.Thread(target=self._tokenize_loop, name="encoder-tokenize", daemon=True)]
        self._threads += [threading.Thread(target=self._forward_loop, name=f"encoder-forward-{n}", daemon=True)
                          for n in range(self.forward_threads)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        if not self._threads:
            return
        self._jobs.put(None, timeout=timeout_s)
        for thread in self._threads:
            thread.join(timeout_s)
        self._threads = []

    @property
    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    async def encode(self, texts: Sequence[str]) -> list[Encoded]:
        """Embedding and sentiment per text, in input order. Raises what the encoder raised."""
        if not texts:
            return []
        if not self.running:
            raise RuntimeError("encoder pipeline is not running")
        if self._slots is None:
            # As many jobs in flight as the job queue holds, so put_nowait below never blocks the loop.
            self._slots = asyncio.Semaphore(self.queue_depth)
        loop = asyncio.get_running_loop()
        job = _Job(list(texts), loop, loop.create_future())
        started = time.perf_counter()
        async with self._slots:
            self._jobs.put_nowait(job)
            results = await job.future
        metrics.ENCODER_SECONDS.observe(time.perf_counter() - started)
        return results

    # -- threads -----------------------------------------------------------------------------------------
    def _tokenize_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                for _ in range(self.forward_threads):
                    self._batches.put(None)
                return
            try:
                token_ids = self.encoder.tokenize(job.texts)
                plan = plan_batches([len(ids) for ids in token_ids], max_batch_tokens=self.max_batch_tokens,
                                    max_batch_size=self.max_batch_size, padded_shape=self.encoder.padded_shape,
                                    min_batches=self.forward_threads)
                job.results = [None] * len(job.texts)
                job.pending = len(plan)  # set before the first batch leaves: the forward thread counts down
                for indices in plan:
                    if job.failed:
                        break
                    rows = [token_ids[i] for i in indices]
                    padded = math.prod(self.encoder.padded_shape(len(rows), max(len(ids) for ids in rows)))
                    self._batches.put(_Batch(job, indices, self.encoder.collate(rows), padded))
            except Exception as exc:  # noqa: BLE001 - handed to the awaiting coroutine, which decides
                log.warning("tokenising a review batch failed: %s", type(exc).__name__)
                job.fail(exc)

    def _forward_loop(self) -> None:
        while True:
            batch = self._batches.get()
            if batch is None:
                return
            job = batch.job
            if job.failed:
                continue
            try:
                started = time.perf_counter()
                encoded = self.encoder.forward(batch.inputs)
                elapsed = time.perf_counter() - started
                if len(encoded) != len(batch.indices):
                    raise RuntimeError(f"encoder returned {len(encoded)} results for {len(batch.indices)} texts")
            except Exception as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                log.warning("encoder forward pass failed: %s", type(exc).__name__)
                job.fail(exc)
                continue
            metrics.REVIEW_BATCH_TOKENS.observe(batch.padded_tokens)
            with self._done:
                self.stats.texts += len(encoded)
                self.stats.forward_passes += 1
                self.stats.padded_tokens += batch.padded_tokens
                self.stats.forward_seconds += elapsed
                for index, result in zip(batch.indices, encoded, strict=True):
                    job.results[index] = result
                job.pending -= 1
                finished = job.pending == 0
            if finished:
                job.resolve()
