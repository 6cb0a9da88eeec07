"""One resident encoder per worker, started once and shared by every review micro-batch.

The real model is loaded on first use, or at worker start with `PROFILE_ENCODER_PRELOAD` (the default), off
the event loop: loading and warming up takes seconds of CPU. Tests hand in another `TextEncoder`.
"""

from __future__ import annotations

import asyncio

from stream_app.encoding.encoder import TextEncoder
from stream_app.encoding.pipeline import EncoderPipeline
from stream_app.ops.settings import Settings


class EncoderService:
    def __init__(self, settings: Settings, encoder: TextEncoder | None = None) -> None:
        self.settings = settings
        self._encoder = encoder
        self._pipeline: EncoderPipeline | None = None
        self._lock = asyncio.Lock()

    async def pipeline(self) -> EncoderPipeline:
        async with self._lock:
            if self._pipeline is None:
                encoder = self._encoder
                if encoder is None:
                    from stream_app.encoding.bert_encoder import BertEncoder

                    loaded: TextEncoder = await asyncio.get_running_loop().run_in_executor(
                        None, BertEncoder.from_settings, self.settings)
                    encoder = self._encoder = loaded
                self._pipeline = EncoderPipeline(
                    encoder, max_batch_tokens=self.settings.encoder_batch_tokens,
                    max_batch_size=self.settings.encoder_batch_size,
                ).start()
        return self._pipeline

    def ready(self) -> bool:
        """For /ready: a worker that preloads is ready once the model is resident and its threads run."""
        return not self.settings.encoder_preload or (self._pipeline is not None and self._pipeline.running)

    def stop(self) -> None:
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            pipeline.stop()
