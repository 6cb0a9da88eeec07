"""CPU batch shapes from a bounded set: padding rules, plans that keep the padded shape under the budget, and the
bound on the kernel caches."""

from __future__ import annotations

import random

from stream_app.encoding import KERNEL_CACHE_ENTRIES, bound_kernel_caches
from stream_app.encoding.pipeline import plan_batches
from stream_app.encoding.shapes import bucketed_length, bucketed_rows


def test_rows_are_exact_up_to_8_then_rounded_up_by_at_most_a_quarter() -> None:
    assert [bucketed_rows(n) for n in range(1, 9)] == list(range(1, 9))
    assert [bucketed_rows(n) for n in (9, 10, 11, 17, 33, 65, 100, 128, 129)] == [10, 10, 12, 20, 40, 80, 112, 128, 160]
    for rows in range(1, 5000):
        padded = bucketed_rows(rows)
        assert rows <= padded <= rows * 1.25
        assert bucketed_rows(padded) == padded  # a padded count is its own bucket
    assert len({bucketed_rows(n) for n in range(1, 129)}) == 24


def test_lengths_round_up_to_a_multiple_of_8_within_the_model_limit() -> None:
    assert [bucketed_length(n, 256) for n in (1, 8, 9, 75, 249, 256)] == [8, 8, 16, 80, 256, 256]
    assert bucketed_length(250, 252) == 252  # a limit that is no multiple of 8 still caps the width
    for longest in range(1, 257):
        width = bucketed_length(longest, 256)
        assert longest <= width <= 256 and (width % 8 == 0 or width == 256)


def test_plans_keep_the_padded_shape_under_the_token_budget() -> None:
    def padded(rows: int, longest: int) -> tuple[int, int]:
        return bucketed_rows(rows), bucketed_length(longest, 256)

    rng = random.Random(7)
    counts = [rng.randint(3, 256) for _ in range(2_000)]
    plan = plan_batches(counts, max_batch_tokens=8192, max_batch_size=128, padded_shape=padded)
    assert sorted(i for batch in plan for i in batch) == list(range(len(counts)))
    for batch in plan:
        rows, width = padded(len(batch), max(counts[i] for i in batch))
        assert rows * width <= 8192
    # Exact shapes fit more texts in a batch: the padded plan may need more passes, never fewer.
    assert len(plan) >= len(plan_batches(counts, max_batch_tokens=8192, max_batch_size=128))
    assert len({padded(len(b), max(counts[i] for i in b)) for b in plan}) < len(plan)  # shapes repeat


def test_kernel_caches_are_bounded_unless_the_operator_chose_a_size() -> None:
    environ: dict[str, str] = {}
    bound_kernel_caches(environ)
    assert environ == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": KERNEL_CACHE_ENTRIES,
                       "LRU_CACHE_CAPACITY": KERNEL_CACHE_ENTRIES}
    chosen = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}
    bound_kernel_caches(chosen)
    assert chosen == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": KERNEL_CACHE_ENTRIES}
