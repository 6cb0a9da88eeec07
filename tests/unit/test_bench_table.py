"""`make bench`'s table: every precision gets a line, including the one this CPU cannot run natively."""

from __future__ import annotations

from typing import Any

import orjson

from bench.run import RESULTS, table


def committed_results() -> dict[str, Any]:
    results: dict[str, Any] = orjson.loads(RESULTS.read_bytes())
    return results


def test_a_precision_the_cpu_lacks_is_reported_with_its_reason_and_the_emulated_cost() -> None:
    results = committed_results()
    results.pop("reviews_fp32", None)
    results["reviews_bf16"] = {"skipped": "no native bf16 here", "encoder_alone_texts": 64,
                               "encoder_alone_texts_per_s": {"bf16": 4.1, "fp32": 26.7}, "bf16_slowdown": 6.5}
    lines = table(results).splitlines()
    bf16 = [line for line in lines if line.startswith("reviews bf16")]
    assert len(bf16) == 2
    assert bf16[0].endswith("not run: no native bf16 here")
    assert "4.1 against 26.7 in fp32 on the same 64 reviews (6.5x slower)" in bf16[1]
    # The default precision's latency rows stay under its own heading, before the other precision's.
    assert lines.index(next(line for line in lines if "half load (reviews/s)" in line)) < lines.index(bf16[0])


def test_both_measured_precisions_print_their_ratio() -> None:
    results = committed_results()
    default = results["reviews"]
    other = "bf16" if default["encoder_ceiling"]["precision"] == "fp32" else "fp32"
    results[f"reviews_{other}"] = {**default, "encoder_ceiling": {**default["encoder_ceiling"], "precision": other},
                                   "ratio_pipeline_to_ceiling": 0.5}
    ratios = [line for line in table(results).splitlines() if "pipeline / ceiling" in line]
    assert len(ratios) == 2
    assert any(line.startswith(f"reviews {other}: pipeline / ceiling") and "0.500" in line for line in ratios)
