"""Reviews: validate, encode text in micro-batches (embedding + sentiment), fold those already on their user's
partition, re-key the others by user id.

The encoder is loaded once per worker and stays resident; its forward pass runs in the encoder
pipeline's own threads, never on the event loop. Review text is dropped here: it does not travel further.

Micro-batches overlap: while batch n's results are dead-lettered, sent and confirmed, batch n+1 is already
admitted and encoding, so the forward threads do not idle for the sends, the broker's acknowledgement and
the refill of the batch buffer. At most `BATCHES_IN_FLIGHT` batches are taken and not finished (memory stays
bounded; the next is taken only when a slot frees). At-least-once holds because the agent keeps one extra
reference on every message of a batch from the moment it takes the batch (Faust's conductor holds one per
subscribed stream; `take_events` drops that one when it moves on) until the batch's enriched events and dead
letters are confirmed by the broker: only then can the consumer count the offsets as processed and commit
them. Batches finish strictly in input order, one at a time, in the agent's own task, so the output per user
keeps the input order and a failed send or encoder crash raises in the agent as before (it is supervised:
the worker exits and the unconfirmed input comes again). A batch still in flight when the agent stops keeps
its reference: its offsets are not committed, and it is delivered again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Final, cast

from faust import StreamT
from faust.streams import Stream
from faust.types import AgentT, AppT, EventT, Message

from schemas.events import Event
from stream_app.core.triage import Rejection
from stream_app.encoding.encoder import Encoded
from stream_app.encoding.pipeline import EncoderPipeline
from stream_app.ops import metrics
from stream_app.worker.admission import admit

if TYPE_CHECKING:
    from stream_app.worker.app import WorkerApp

#: Micro-batches taken from the stream and not yet finished (sent, confirmed, released): one finishing while
#: the next encodes is enough to keep the forward threads busy (a full micro-batch is several passes, a small one is
#: split among them); more would only hold more input in memory.
BATCHES_IN_FLIGHT: Final = 2

Prepared = tuple[list[tuple[Event, Message]], list[Encoded | Exception]]


def enrich(event: Event, encoded: Encoded) -> Event:
    return dataclasses.replace(event, text=None, sentiment=encoded.sentiment, embedding=encoded.embedding)


def non_finite(encoded: Encoded) -> str | None:
    """Why an encoder result cannot enter a profile (NaN/inf would poison every decayed sum), or None."""
    if not math.isfinite(encoded.sentiment):
        return "encoder returned a non-finite sentiment"
    if not all(math.isfinite(x) for x in encoded.embedding):
        return "encoder returned a non-finite embedding"
    return None


async def encode_or_isolate(encoder: EncoderPipeline, events: Sequence[Event]) -> list[Encoded | Exception]:
    """Encode a batch; if the batch fails, encode one by one so one poisonous text cannot block the rest."""
    texts = [e.text or "" for e in events]
    try:
        return list(await encoder.encode(texts))
    except Exception:  # isolated per event below, each failure is dead-lettered
        results: list[Encoded | Exception] = []
        for text in texts:
            try:
                results.extend(await encoder.encode([text]))
            except Exception as exc:
                results.append(exc)
        return results


def hold(events: Sequence[EventT]) -> None:
    """One more reference on each message, so that `take_events` acknowledging them does not make their
    offsets committable: that waits for `release`."""
    for event in events:
        event.message.incref()


def release(app: AppT, events: Sequence[EventT]) -> None:
    """Drop the reference `hold` took; the last reference dropped marks the offset processed (committable),
    as `Stream.ack` does."""
    consumer, message_out = app.consumer, app.sensors.on_message_out
    for event in events:
        message = event.message
        if message.ack(consumer):
            message_out(message.tp, message.offset, message)


@dataclasses.dataclass(eq=False)
class _InFlight:
    events: Sequence[EventT]
    prepared: asyncio.Task[Prepared]


async def _take(batches: AsyncIterable[Sequence[EventT]], taken: asyncio.Queue[_InFlight | None],
                slots: asyncio.Semaphore, prepare: Callable[[Sequence[EventT]], Coroutine[Any, Any, Prepared]]) -> None:
    """Takes micro-batches, holds their messages and starts their admission and encoding; hands them on in
    order, then None however it ends (the agent asks the task why). After each batch it waits for a free slot
    before it lets `take_events` collect the next one."""
    try:
        async for events in batches:
            hold(events)  # before anything can suspend: take_events acks these events once it is resumed
            taken.put_nowait(_InFlight(events, asyncio.create_task(prepare(events))))
            await slots.acquire()
    finally:
        taken.put_nowait(None)


def register(worker: WorkerApp) -> AgentT:
    settings, encoder = worker.settings, worker.encoder
    worker.readiness["encoder"] = encoder.ready

    async def encode_reviews(stream: StreamT[bytes]) -> AsyncIterator[int]:
        if settings.encoder_preload:
            await encoder.pipeline()
        batches = cast(Stream[bytes], stream).take_events(settings.review_batch_max,
                                                           within=settings.review_batch_within_s)

        async def prepare(events: Sequence[EventT]) -> Prepared:
            """Admission and encoding of one batch, in a task of its own (it overlaps the previous batch's
            sends); the dead letters of admission are confirmed here, before the batch can be released."""
            metrics.BATCH_EVENTS.labels("reviews").observe(len(events))
            valid = await admit(settings, worker.output, events, worker.refused_live)
            results = await encode_or_isolate(await encoder.pipeline(), [e for e, _ in valid]) if valid else []
            await worker.output.confirm_sends()
            return valid, results

        taken: asyncio.Queue[_InFlight | None] = asyncio.Queue()
        slots = asyncio.Semaphore(BATCHES_IN_FLIGHT - 1)  # the taker holds one batch more than it has slots
        taker = asyncio.create_task(_take(batches, taken, slots, prepare))
        try:
            while (batch := await taken.get()) is not None:
                valid, results = await batch.prepared
                enriched: list[tuple[Event, Message]] = []
                for (review, message), result in zip(valid, results, strict=True):
                    if isinstance(result, Exception):
                        reason = f"encoder failed on this text: {type(result).__name__}"[:500]
                        await worker.output.dead_letter(message, Rejection("encoder_error", reason))
                    elif (problem := non_finite(result)) is not None:
                        await worker.output.dead_letter(message, Rejection("encoder_error", problem))
                    else:
                        enriched.append((enrich(review, result), message))
                await worker.folder.fold_or_forward(enriched)
                await worker.output.confirm_sends()  # a failed send raises here, before the batch is released
                release(worker.app, batch.events)
                slots.release()
                yield len(batch.events)
            taker.result()  # the stream ended: raises what ended the taker, if anything did
        finally:
            # Stopping or crashed: what is still in flight stays held (never committed) and comes again.
            taker.cancel()
            while not taken.empty():
                if (in_flight := taken.get_nowait()) is not None:
                    in_flight.prepared.cancel()

    return worker.app.agent(worker.topics.reviews, name="encode_reviews")(encode_reviews)
