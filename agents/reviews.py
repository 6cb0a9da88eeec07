"""Reviews: validate, encode text in micro-batches (embedding + sentiment), re-key by user id.

The encoder is loaded once per worker and stays resident; its forward pass runs in the encoder
pipeline's own threads, never on the event loop. Review text is dropped here: it does not travel further.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import cast

from faust import StreamT
from faust.streams import Stream

from schemas.events import Event
from stream_app import metrics
from stream_app.app import app, settings
from stream_app.encoder import Encoded, TextEncoder
from stream_app.encoder_pipeline import EncoderPipeline
from stream_app.health import readiness_checks
from stream_app.publish import admit, publish_dead_letter, publish_events
from stream_app.topics import reviews

_pipeline: EncoderPipeline | None = None
_pipeline_lock = asyncio.Lock()
readiness_checks["encoder"] = lambda: not settings.encoder_preload or (_pipeline is not None and _pipeline.running)


def use_encoder(encoder: TextEncoder | None) -> None:
    """Serve reviews with this encoder (tests use FakeEncoder); None goes back to the real model."""
    global _pipeline
    if _pipeline is not None:
        _pipeline.stop()
    _pipeline = None if encoder is None else _start_pipeline(encoder)


def _start_pipeline(encoder: TextEncoder) -> EncoderPipeline:
    pipeline = EncoderPipeline(
        encoder, max_batch_tokens=settings.encoder_batch_tokens, max_batch_size=settings.encoder_batch_size
    )
    return pipeline.start()


async def pipeline() -> EncoderPipeline:
    global _pipeline
    async with _pipeline_lock:
        if _pipeline is None:
            from stream_app.bert_encoder import BertEncoder

            # Loading and warming up the model takes seconds of CPU: keep it off the event loop.
            encoder = await asyncio.get_running_loop().run_in_executor(None, BertEncoder.from_settings, settings)
            _pipeline = _start_pipeline(encoder)
    return _pipeline


def enrich(event: Event, encoded: Encoded) -> Event:
    return dataclasses.replace(event, text=None, sentiment=encoded.sentiment, embedding=encoded.embedding)


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


@app.agent(reviews)
async def encode_reviews(stream: StreamT[bytes]) -> AsyncIterator[int]:
    if settings.encoder_preload:
        await pipeline()
    batches = cast(Stream[bytes], stream).take_events(settings.review_batch_max, within=settings.review_batch_within_s)
    async for batch in batches:
        metrics.BATCH_EVENTS.labels("reviews").observe(len(batch))
        valid = await admit(batch)
        results = await encode_or_isolate(await pipeline(), [e for e, _ in valid]) if valid else []
        enriched: list[Event] = []
        for (review, message), result in zip(valid, results, strict=True):
            if isinstance(result, Exception):
                await publish_dead_letter(message, f"encoder failed on this text: {type(result).__name__}"[:500])
            else:
                enriched.append(enrich(review, result))
        await publish_events(enriched)
        yield len(batch)
