"""Replay determinism: live run == replay from topics == shuffled replay from a file, re-partitioned."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from stream_app.event_files import write_events
from stream_app.sample_data import sample_events
from tests.integration.conftest import Stack
from tests.oracle import assert_close_maps

pytestmark = pytest.mark.integration


def real_events(customers: int) -> list[dict[str, Any]]:
    # Reviews join once the encoder path is in; clicks and searches carry all decayed sums.
    return [e for e in sample_events(customers=customers) if e["type"] != "review"]


def assert_same_profiles(actual: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    by_user = {p["user_id"]: p for p in expected}
    assert sorted(p["user_id"] for p in actual) == sorted(by_user)
    for profile in actual:
        reference = by_user[profile["user_id"]]
        assert profile["as_of"] == reference["as_of"]
        for name in ("activity", "interests", "keywords"):
            assert_close_maps(profile[name], reference[name])
        for name in ("rating", "sentiment"):
            if reference[name] is None:
                assert profile[name] is None
            else:
                assert profile[name] == pytest.approx(reference[name], rel=1e-9)


def test_live_equals_replay_equals_shuffled_repartitioned_replay(stack: Stack, tmp_path: Path) -> None:
    events = real_events(customers=400)
    assert len(events) > 2000
    stack.produce(events)
    stack.start_worker()
    stack.wait_for_events({e["event_id"] for e in events}, timeout_s=120)
    live = stack.snapshot_cli()

    stack.cli("replay", "--name", "from-topics", "--quiet")
    replayed = stack.snapshot_cli("--topic", f"{stack.settings.topic_deltas}-replay-from-topics")
    assert_same_profiles(replayed, live)

    shuffled = events[:]
    random.Random(11).shuffle(shuffled)
    path = tmp_path / "shuffled.parquet"
    write_events(path, shuffled)
    stack.cli("replay", "--name", "shuffled", "--files", str(path), "--quiet",
              env={"PROFILE_PARTITIONS": "2", "PROFILE_INPUT_PARTITIONS": "3"})
    reshuffled = stack.snapshot_cli("--topic", f"{stack.settings.topic_deltas}-replay-shuffled")
    assert_same_profiles(reshuffled, live)
