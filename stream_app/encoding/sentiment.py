"""Sentiment from the encoder's pooled embedding: a small multinomial logistic-regression head.

No sentiment model ships in any package we may use, so the head is trained here on real labelled reviews
(`stream-app train-sentiment`, see `stream_app.encoding.sentiment_training`) and its weights are committed in
`sentiment_head.json`: a worker needs no training at start. Classes come from star ratings
(1-2 negative, 3 neutral, 4-5 positive); the score is P(positive) - P(negative), in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import torch

CLASSES = ("negative", "neutral", "positive")
DEFAULT_HEAD_PATH = Path(__file__).with_name("sentiment_head.json")


@dataclass
class SentimentHead:
    weight: torch.Tensor  # (classes, dimension), fp32
    bias: torch.Tensor  # (classes,)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def dimension(self) -> int:
        return int(self.weight.shape[1])

    def probabilities(self, embeddings: torch.Tensor) -> torch.Tensor:
        return torch.softmax(embeddings.float() @ self.weight.T + self.bias, dim=-1)

    def score(self, embeddings: torch.Tensor) -> torch.Tensor:
        probabilities = self.probabilities(embeddings)
        return (probabilities[:, CLASSES.index("positive")] - probabilities[:, CLASSES.index("negative")]).clamp(-1, 1)

    def save(self, path: Path) -> None:
        document = {
            "classes": list(CLASSES),
            "weight": [[round(x, 7) for x in row] for row in self.weight.tolist()],
            "bias": [round(x, 7) for x in self.bias.tolist()],
            "metadata": self.metadata,
        }
        path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))

    @classmethod
    def load(cls, path: Path) -> SentimentHead:
        document = orjson.loads(path.read_bytes())
        if tuple(document.get("classes", ())) != CLASSES:
            raise ValueError(f"{path}: expected classes {CLASSES}, found {document.get('classes')}")
        weight = torch.tensor(document["weight"], dtype=torch.float32)
        bias = torch.tensor(document["bias"], dtype=torch.float32)
        if weight.ndim != 2 or weight.shape[0] != len(CLASSES) or bias.shape != (len(CLASSES),):
            raise ValueError(f"{path}: weight must be ({len(CLASSES)}, d) and bias ({len(CLASSES)},)")
        return cls(weight, bias, dict(document.get("metadata", {})))

    @classmethod
    def load_default(cls) -> SentimentHead:
        if not DEFAULT_HEAD_PATH.is_file():
            raise FileNotFoundError(f"{DEFAULT_HEAD_PATH} is missing: run `stream-app train-sentiment`")
        return cls.load(DEFAULT_HEAD_PATH)


def label_of_rating(rating: int) -> int:
    """Index into CLASSES for a 1-5 star rating."""
    if rating <= 2:
        return CLASSES.index("negative")
    if rating == 3:
        return CLASSES.index("neutral")
    return CLASSES.index("positive")
