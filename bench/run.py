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

from bench import click_search, latency, reviews
from stream_app.encoding import torch_process_defaults
from stream_app.kafka.embedded_broker import EmbeddedBroker
from stream_app.ops.logging_setup import quiet_third_party_output
from stream_app.ops.settings import Settings

RESULTS = Path(__file__).with_name("results.json")


def machine() -> dict[str, Any]:
    import torch

    from stream_app.encoding.bert_encoder import usable_cores

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    settings = Settings()
    return {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable_cores(), "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "encoder_device": settings.encoder_device, "encoder_threads": settings.encoder_threads,
        "encoder_streams": settings.encoder_streams,
        "review_batch_max": settings.review_batch_max, "encoder_batch_tokens": settings.encoder_batch_tokens,
        "faust_message_sensors": settings.faust_message_sensors,
        "note": "broker, worker and load generator share this machine",
    }


def main() -> int:
    # The encoder ceilings run in processes started from here: the worker's torch defaults, and no
    # progress bar per model load in the table.
    torch_process_defaults(os.environ)
    quiet_third_party_output()
    from stream_app.encoding.bert_encoder import cpu_supports_bf16

    started = time.perf_counter()
    results: dict[str, Any] = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine()}
    limit = os.environ.get("BENCH_CLICK_SEARCH_EVENTS")
    reviews_count = int(os.environ.get("BENCH_REVIEWS", "2000"))
    with EmbeddedBroker() as broker:
        print("click/search: one worker on a backlog of real-derived events, then the hand-written loop ...",
              flush=True)
        results["click_search"] = click_search.run(broker, int(limit) if limit else None)
        print("latency: steady 500 and 2,000 events/s through an instrumented worker ...", flush=True)
        results["latency"] = latency.run(broker, click_search.click_search_events(),
                                         seconds=float(os.environ.get("BENCH_LATENCY_SECONDS", "20")))
        print("reviews: encoder ceiling, pipeline at full and half load, per-event baseline ...", flush=True)
        results["reviews"] = reviews.run(broker, reviews=reviews_count,
                                         per_event_reviews=int(os.environ.get("BENCH_PER_EVENT_REVIEWS", "600")),
                                         branch_cost_reviews=int(os.environ.get("BENCH_BRANCH_COST_REVIEWS", "1000")))
        precision = results["reviews"]["encoder_ceiling"]["precision"]
        other = "fp32" if precision != "fp32" else ("bf16" if cpu_supports_bf16() else None)
        if other is not None:
            print(f"reviews: encoder ceiling and pipeline in {other} ...", flush=True)
            results[f"reviews_{other}"] = reviews.run(
                broker, reviews=int(os.environ.get("BENCH_OTHER_PRECISION_REVIEWS", str(reviews_count // 2))),
                precision=other, full_only=True)
        else:
            print("reviews: no native bf16 here; the encoder alone in emulated bf16 and fp32 ...", flush=True)
            texts = [e["text"] for e in reviews.review_events(int(os.environ.get("BENCH_EMULATED_BF16_REVIEWS", "64")))]
            results["reviews_bf16"] = reviews.emulated_bf16(Settings(), texts)
    results["bench_seconds"] = round(time.perf_counter() - started, 1)
    RESULTS.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")
    print(table(results))
    print(f"written to {RESULTS}")
    return 0


def table(results: dict[str, Any]) -> str:
    c, lat = results["click_search"], results["latency"]["rates"]
    rows = [
        ("click/search, one worker (events/s)", f"{c['worker_events_per_s']:.0f}"
                                                f"  ({c['worker_cpu_us_per_event']:.0f} us CPU/event)"),
        ("hand-written loop, same records (events/s)", f"{c['reference_loop']['events_per_s']:.0f}"),
        ("worker / loop", f"{c['ratio_worker_to_loop']:.3f}"),
    ]
    for rate, phase in lat.items():
        rows.append((f"produce->delta at {rate}/s p50 / p99 (ms)",
                     f"{phase['latency_p50_ms']} / {phase['latency_p99_ms']}"))
        for stage, numbers in phase["stages_ms"].items():
            rows.append((f"  {stage} p50 / p99 (ms)", f"{numbers['p50_ms']} / {numbers['p99_ms']}"))
        parts = ", ".join(f"{k} {v}" for k, v in phase["cpu_us_per_event_by_part"].items())
        rows.append(("  CPU us/event, our calls", parts))
        threads = ", ".join(f"{k} {v}" for k, v in phase["cpu_us_per_event_by_thread"].items())
        rows.append(("  CPU us/event, by thread", threads))
    for key in ("reviews", "reviews_fp32", "reviews_bf16"):
        part = results.get(key)
        if not part:
            continue
        if "skipped" in part:
            rows.append((f"{key.replace('_', ' ')}: pipeline / ceiling", f"not run: {part['skipped']}"))
            if "encoder_alone_texts_per_s" in part:
                rates = part["encoder_alone_texts_per_s"]
                rows.append((f"{key.replace('_', ' ')}: encoder alone, emulated (texts/s)",
                             f"{rates['bf16']:.1f} against {rates['fp32']:.1f} in fp32 on the same "
                             f"{part['encoder_alone_texts']} reviews ({part['bf16_slowdown']:g}x slower)"))
            continue
        ceiling = part["encoder_ceiling"]
        label = f"reviews {ceiling['precision']}"
        rows += [
            (f"{label}: encoder ceiling (texts/s)", f"{ceiling['texts_per_s']:.1f}  (each, before, between and "
                                                    f"after the pipeline runs: {_each(ceiling['texts_per_s_each'])})"),
            *_branch_rows(part.get("sentiment_branch_cost", {})),
            (f"{label}: pipeline, full load (reviews/s)", f"{part['pipeline_full_load']['reviews_per_s']:.1f}  (each: "
                                                          f"{_each(part['pipeline_full_load']['reviews_per_s_each'])})"),
            (f"{label}: pipeline / ceiling", f"{part['ratio_pipeline_to_ceiling']:.3f}  (each run: "
                                             f"{_each(part['ratio_each_run'])})"),
        ]
        if key == "reviews":
            rows += _load_rows(part)
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def _load_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The default precision's latencies, half load and per-event baseline, listed under its rows."""
    return [
        ("  full load latency p50 / p99 (s)", f"{r['pipeline_full_load']['latency_p50_s']} / "
                                              f"{r['pipeline_full_load']['latency_p99_s']}"),
        ("  half load (reviews/s)", f"{r['pipeline_half_load']['reviews_per_s']:.1f}"),
        ("  half load latency p50 / p99 (s)", f"{r['pipeline_half_load']['latency_p50_s']} / "
                                              f"{r['pipeline_half_load']['latency_p99_s']}"),
        ("  per-event baseline (reviews/s)", f"{r['per_event_baseline']['reviews_per_s']:.1f}"),
        ("  batched / per-event", f"{r['ratio_batched_to_per_event']:.2f}"),
    ]


def _each(values: list[float]) -> str:
    return " / ".join(f"{v:g}" for v in values)


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
