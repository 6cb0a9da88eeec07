"""Ingest: validate clicks and searches, fold those already on their user's partition, re-key the others by user
id, and dead-letter everything else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, cast

from faust import StreamT
from faust.streams import Stream
from faust.types import AgentT

from stream_app.ops import metrics
from stream_app.worker.admission import admit

if TYPE_CHECKING:
    from stream_app.worker.app import WorkerApp


def register(worker: WorkerApp) -> AgentT:
    settings = worker.settings

    async def ingest(stream: StreamT[bytes]) -> AsyncIterator[int]:
        batches = cast(Stream[bytes], stream).take_events(settings.batch_max, within=settings.batch_within_s)
        async for batch in batches:
            metrics.BATCH_EVENTS.labels("ingest").observe(len(batch))
            await worker.folder.fold_or_forward(await admit(settings, worker.output, batch, worker.refused_live))
            await worker.output.confirm_sends()  # before the batch is acknowledged: a failed send fails the batch
            yield len(batch)

    return worker.app.agent(worker.topics.clicks_and_searches, name="ingest")(ingest)
