"""Input commits never pass an unprocessed record (stream_app/worker/commit_safety.py)."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace
from typing import Any

from faust.transport.consumer import Consumer
from faust.types import TP
from intervaltree import IntervalTree

from stream_app.worker import commit_safety
from stream_app.worker.commit_safety import new_offset

TP0 = TP("clicks", 0)


def test_the_commit_waits_for_a_single_unprocessed_record_at_the_head() -> None:
    # Faust 0.15.3 committed 938 here: the one record at 227 was skipped for good.
    assert new_offset([*range(228, 938)], committed=227) == (None, [*range(228, 938)])


def test_the_commit_advances_over_the_run_that_starts_at_the_committed_offset() -> None:
    assert new_offset([227, 228, 229, 231, 232], committed=227) == (230, [231, 232])
    assert new_offset([5, 3, 4, 4], committed=3) == (6, [])


def test_without_a_known_commit_the_first_run_counts() -> None:
    assert new_offset([7, 8, 10], committed=None) == (9, [10])
    assert new_offset([], committed=4) == (None, [])


def test_committed_offset_zero_is_a_real_base() -> None:
    # Faust skipped its check for a committed offset of 0 (falsy).
    assert new_offset([1, 2, 3], committed=0) == (None, [1, 2, 3])
    assert new_offset([0, 1, 2], committed=0) == (3, [])


def consumer_state(acked: list[int], committed: int | None, gaps: tuple[tuple[int, int], ...] = ()) -> Any:
    tree = IntervalTree()
    for begin, end in gaps:
        tree.addi(begin, end)
    return SimpleNamespace(
        _acked=defaultdict(list, {TP0: list(acked)}),
        _acked_index=defaultdict(set, {TP0: set(acked)}),
        _gap=defaultdict(IntervalTree, {TP0: tree}),
        _committed_offset=defaultdict(lambda: None, {TP0: committed}),
    )


def test_installed_consumer_commits_over_offsets_the_broker_showed_missing_only() -> None:
    commit_safety.install()
    state = consumer_state([10, 11, 14, 15], committed=10, gaps=((12, 14),))  # 12, 13: a transaction marker
    assert Consumer._new_offset(state, TP0) == 16
    assert state._acked[TP0] == [] and state._acked_index[TP0] == set()
    unprocessed = consumer_state([11, 12], committed=10)
    assert Consumer._new_offset(unprocessed, TP0) is None
    assert unprocessed._acked[TP0] == [11, 12]


def test_installed_fetch_loop_never_drops_or_invents_gaps() -> None:
    commit_safety.install()
    read = commit_safety._NeverRead()
    read[TP0] = 500  # what Faust's seek writes
    assert read[TP0] is None  # what the fetch loop reads: no record below 500 is dropped, no gap up to 500 invented
