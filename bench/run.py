"""`make bench`: every benchmark in one run on one machine; prints a table, writes bench/results.json.

Sizes can be cut for a quick look: BENCH_REVIEWS, BENCH_PER_EVENT_REVIEWS, BENCH_BRANCH_COST_REVIEWS,
BENCH_CLICK_SEARCH_EVENTS.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench import click_search, reviews
from stream_app.kafka.embedded_broker import EmbeddedBroker
from stream_app.ops.settings import Settings

RESULTS = Path(__file__).with_name("results.json")


def machine() -> dict[str, Any]:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    settings = Settings()
    return {
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "encoder_device": settings.encoder_device, "encoder_threads": settings.encoder_threads,
        "review_batch_max": settings.review_batch_max, "encoder_batch_tokens": settings.encoder_batch_tokens,
        "note": "broker, worker and load generator share this machine",
    }


def main() -> int:
    started = time.perf_counter()
    results: dict[str, Any] = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine()}
    with EmbeddedBroker() as broker:
        print("reviews: encoder ceiling, pipeline at full and half load, per-event baseline ...", flush=True)
        results["reviews"] = reviews.run(broker, reviews=int(os.environ.get("BENCH_REVIEWS", "2000")),
                                         per_event_reviews=int(os.environ.get("BENCH_PER_EVENT_REVIEWS", "600")),
                                         branch_cost_reviews=int(os.environ.get("BENCH_BRANCH_COST_REVIEWS", "1000")))
        print("click/search: one worker on a backlog of real-derived events ...", flush=True)
        limit = os.environ.get("BENCH_CLICK_SEARCH_EVENTS")
        results["click_search"] = click_search.run(broker, int(limit) if limit else None)
    results["bench_seconds"] = round(time.perf_counter() - started, 1)
    RESULTS.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")
    print(table(results))
    print(f"written to {RESULTS}")
    return 0


def table(results: dict[str, Any]) -> str:
    r, c = results["reviews"], results["click_search"]
    rows = [
        ("encoder ceiling (texts/s)", f"{r['encoder_ceiling']['texts_per_s']:.1f}"),
        *_branch_rows(r.get("sentiment_branch_cost", {})),
        ("pipeline, full load (reviews/s)", f"{r['pipeline_full_load']['reviews_per_s']:.1f}"),
        ("  latency p50 / p99 (s)", f"{r['pipeline_full_load']['latency_p50_s']} / "
                                    f"{r['pipeline_full_load']['latency_p99_s']}"),
        ("pipeline, half load (reviews/s)", f"{r['pipeline_half_load']['reviews_per_s']:.1f}"),
        ("  latency p50 / p99 (s)", f"{r['pipeline_half_load']['latency_p50_s']} / "
                                    f"{r['pipeline_half_load']['latency_p99_s']}"),
        ("per-event baseline (reviews/s)", f"{r['per_event_baseline']['reviews_per_s']:.1f}"),
        ("pipeline / ceiling", f"{r['ratio_pipeline_to_ceiling']:.3f}"),
        ("batched / per-event", f"{r['ratio_batched_to_per_event']:.2f}"),
        ("click/search (events/s, one worker)", f"{c['worker_events_per_s']:.0f}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def _branch_rows(cost: dict[str, Any]) -> list[tuple[str, str]]:
    if "with_branch" not in cost:
        return [("sentiment branch cost", cost.get("skipped", "not measured"))]
    return [
        ("encoder without / with sentiment branch (texts/s)",
         f"{cost['without_branch']['texts_per_s']:.1f} / {cost['with_branch']['texts_per_s']:.1f}"),
        ("  extra encoder time for the branch", f"{cost['extra_encoder_time_pct']:+.1f}%"),
    ]


if __name__ == "__main__":
    sys.exit(main())
