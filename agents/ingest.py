"""Ingest: validate clicks and searches, fold those already on their user's partition, re-key the others by user
id, and dead-letter everything else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from faust import StreamT
from faust.types import AgentT

from stream_app.ops import metrics
from stream_app.worker.admission import admit
from stream_app.worker.batches import take_batches

if TYPE_CHECKING:
    from stream_app.worker.app import WorkerApp


def register(worker: WorkerApp) -> AgentT:
    settings = worker.settings

    async def ingest(stream: StreamT[bytes]) -> AsyncIterator[int]:
        async for batch in take_batches(stream, settings.batch_max, settings.batch_within_s,
                                        settings.buffer_max_bytes):
            metrics.BATCH_EVENTS.labels("ingest").observe(len(batch))
            await worker.folder.fold_or_forward(await admit(settings, worker.output, batch, worker.refused_live))
            await worker.output.confirm_sends()  # before the batch is acknowledged: a failed send fails the batch
            yield len(batch)

    return worker.app.agent(worker.topics.clicks_and_searches, name="ingest")(ingest)
