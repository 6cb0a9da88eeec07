"""Review-text encoding: the interface the review agent uses, and a clearly fake encoder for fast tests.

The real encoder (all-MiniLM-L6-v2 through `transformers`, resident on GPU or CPU) lives in
`stream_app.bert_encoder`; `stream_app.encoder_pipeline` runs any `TextEncoder` off the event loop.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Encoded:
    embedding: tuple[float, ...]  # L2-normalised
    sentiment: float  # in [-1, 1]


class TextEncoder(Protocol):
    """Two stages, so that tokenising batch n+1 can overlap the forward pass of batch n."""

    dimension: int
    max_length: int

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text after truncation to max_length (special tokens included)."""
        ...

    def tokenize(self, texts: Sequence[str]) -> Any:
        """Model inputs for one batch, padded to its longest text. CPU work, thread-safe."""
        ...

    def forward(self, inputs: Any) -> list[Encoded]:
        """One forward pass (pooling, normalisation, sentiment included), in input order."""
        ...


class FakeEncoder:
    """NOT a model: deterministic pseudo-embeddings from a hash of the text, for fast agent tests only.

    Sentiment is +0.5 if the text contains "good" and -0.5 if it contains "bad", else 0.
    """

    def __init__(self, dimension: int = 8, max_length: int = 128) -> None:
        self.dimension = dimension
        self.max_length = max_length

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        return [min(len(t.split()) + 2, self.max_length) for t in texts]

    def tokenize(self, texts: Sequence[str]) -> list[str]:
        return list(texts)

    def forward(self, inputs: list[str]) -> list[Encoded]:
        return [self._encode(text) for text in inputs]

    def _encode(self, text: str) -> Encoded:
        digest = hashlib.sha256(text.encode()).digest()
        raw = [b - 127.5 for b in digest[: self.dimension]]
        norm = math.sqrt(sum(x * x for x in raw)) or 1.0
        lowered = text.lower()
        sentiment = 0.5 if "good" in lowered else -0.5 if "bad" in lowered else 0.0
        return Encoded(tuple(x / norm for x in raw), sentiment)
