"""Review-text encoding: the interface the review agent uses, and a clearly fake encoder for fast tests.

The real encoder (all-MiniLM-L6-v2 through `transformers`, resident on GPU or CPU) lives in
`stream_app.encoding.bert_encoder`; `stream_app.encoding.pipeline` runs any `TextEncoder` off the event loop.
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
    """Three stages, so that preparing batch n+1 (CPU) can overlap the forward pass of batch n.

    The encoder pipeline calls `tokenize` once per micro-batch, sorts by length, cuts forward batches
    by a padded-token budget, and `collate`s each one while the previous one is in `forward`.
    """

    dimension: int
    max_length: int
    #: forward passes that may run at once, each called from a thread of its own
    concurrent_passes: int

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, truncated to max_length (special tokens included). Thread-safe."""
        ...

    def padded_shape(self, rows: int, longest: int) -> tuple[int, int]:
        """(rows, tokens per row) that `collate` pads a batch of `rows` texts, the longest `longest`, to."""
        ...

    def collate(self, token_ids: Sequence[Sequence[int]]) -> Any:
        """Model inputs for one forward batch, padded to `padded_shape`. Thread-safe."""
        ...

    def forward(self, inputs: Any) -> list[Encoded]:
        """One forward pass (pooling, normalisation, sentiment included), in input order."""
        ...


class FakeEncoder:
    """NOT a model: deterministic pseudo-embeddings from a hash of the text, for fast agent tests only.

    Tokens are the text's UTF-8 bytes (so token counts are easy to reason about in tests). Sentiment is
    +0.5 if the text contains "good" and -0.5 if it contains "bad", else 0. `forward_calls` records the
    batch shape of every forward pass.
    """

    def __init__(self, dimension: int = 8, max_length: int = 128) -> None:
        self.dimension = dimension
        self.max_length = max_length
        self.concurrent_passes = 1
        self.forward_calls: list[tuple[int, int]] = []  # (texts, padded tokens)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(text.encode()[: self.max_length]) or [0] for text in texts]

    def padded_shape(self, rows: int, longest: int) -> tuple[int, int]:
        return rows, longest

    def collate(self, token_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        return [list(ids) for ids in token_ids]

    def forward(self, inputs: list[list[int]]) -> list[Encoded]:
        self.forward_calls.append((len(inputs), len(inputs) * max(len(ids) for ids in inputs)))
        return [self._encode(bytes(ids).decode(errors="ignore")) for ids in inputs]

    def _encode(self, text: str) -> Encoded:
        digest = hashlib.sha256(text.encode()).digest()
        raw = [b - 127.5 for b in digest[: self.dimension]]
        norm = math.sqrt(sum(x * x for x in raw)) or 1.0
        lowered = text.lower()
        sentiment = 0.5 if "good" in lowered else -0.5 if "bad" in lowered else 0.0
        return Encoded(tuple(x / norm for x in raw), sentiment)
