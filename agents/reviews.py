"""Reviews: validate, encode text in micro-batches (embedding + sentiment), re-key by user id.

The encoder is loaded once per worker and stays resident; its forward pass runs in the encoder
pipeline's own threads, never on the event loop. Review text is dropped here: it does not travel further.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, cast

from faust import StreamT
from faust.streams import Stream
from faust.types import AgentT

from schemas.events import Event
from stream_app.core.triage import Rejection
from stream_app.encoding.encoder import Encoded
from stream_app.encoding.pipeline import EncoderPipeline
from stream_app.ops import metrics
from stream_app.worker.admission import admit

if TYPE_CHECKING:
    from stream_app.worker.app import WorkerApp


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


def register(worker: WorkerApp) -> AgentT:
    settings, encoder = worker.settings, worker.encoder
    worker.readiness["encoder"] = encoder.ready

    async def encode_reviews(stream: StreamT[bytes]) -> AsyncIterator[int]:
        if settings.encoder_preload:
            await encoder.pipeline()
        batches = cast(Stream[bytes], stream).take_events(settings.review_batch_max,
                                                           within=settings.review_batch_within_s)
        async for batch in batches:
            metrics.BATCH_EVENTS.labels("reviews").observe(len(batch))
            valid = await admit(settings, worker.output, batch, worker.refused_live)
            results = await encode_or_isolate(await encoder.pipeline(), [e for e, _ in valid]) if valid else []
            enriched: list[Event] = []
            for (review, message), result in zip(valid, results, strict=True):
                if isinstance(result, Exception):
                    reason = f"encoder failed on this text: {type(result).__name__}"[:500]
                    await worker.output.dead_letter(message, Rejection("encoder_error", reason))
                elif (problem := non_finite(result)) is not None:
                    await worker.output.dead_letter(message, Rejection("encoder_error", problem))
                else:
                    enriched.append(enrich(review, result))
            await worker.output.events(enriched)
            await worker.output.confirm_sends()  # before the batch is acknowledged: a failed send fails the batch
            yield len(batch)

    return worker.app.agent(worker.topics.reviews, name="encode_reviews")(encode_reviews)
