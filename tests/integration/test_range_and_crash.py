"""Against a real worker: valid events decades apart, bad clocks, read times, and a worker that must stop.

Issue 12: two valid clicks at ts=0 and ts=1.7e9 in one micro-batch used to kill the profile agent for good
while the worker stayed up; a profile built under another half-life did the same.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from schemas.events import Event
from stream_app.core.profile import ProfileParams
from tests.integration.conftest import Stack, http_get
from tests.integration.test_hostile import wait_for_dead_letters
from tests.oracle import assert_view_matches, expected_view

pytestmark = pytest.mark.integration


def click(event_id: str, user: str, ts: Any) -> dict[str, Any]:
    return {"event_id": event_id, "user_id": user, "ts": ts, "type": "click", "item_id": "i", "category": "shoes"}


def test_events_decades_apart_and_bad_clocks_leave_every_profile_finite_and_the_worker_working(stack: Stack) -> None:
    now = time.time()
    span = [click("old", "span", 0), click("new", "span", 1_700_000_000)]  # one flush: one micro-batch as a rule
    future = [click("ahead", "span", now + 3 * 86400), click("y2199", "span", "2199-12-31T00:00:00Z")]
    others = [click(f"o{i}", f"user-{i % 4}", 1_700_000_000 + i) for i in range(20)]
    stack.start_worker()
    stack.produce(span + future + others)
    deltas = stack.wait_for_events({e["event_id"] for e in span + others}, timeout_s=120)
    counted = {eid for d in deltas for eid in d["event_ids"]}
    assert not counted & {"ahead", "y2199"}
    letters = wait_for_dead_letters(stack, 2)
    kinds = sorted(dict(letter.headers)["dlq.kind"].decode() for letter in letters)
    assert kinds == ["future_timestamp", "future_timestamp"], kinds

    params = ProfileParams.from_settings(stack.settings)
    snapshot = {p["user_id"]: p for p in stack.snapshot_cli()}
    events = [Event(e["event_id"], e["user_id"], float(e["ts"]), "click", category="shoes", item_id="i")
              for e in span + others]
    for user, view in snapshot.items():
        assert_view_matches(view, expected_view(user, [e for e in events if e.user_id == user], params))
    # The 1970 click is ~2,800 half-lives older than the 2023 one: it weighs exactly 0.
    assert snapshot["span"]["activity"] == {"click": 1.0} and snapshot["span"]["as_of"] == 1_700_000_000
    # Any read time in range is answered (years before the profile: at its as_of); out of range: 400.
    assert stack.snapshot_cli("--at", "0") == stack.snapshot_cli()
    assert http_get(stack.web_ports[0], "/profiles/span?at=0") == (200, snapshot["span"])
    status, body = http_get(stack.web_ports[0], "/profiles/span?at=7258118400")
    assert status == 400 and "outside 1970-01-01..2200-01-01" in body["error"]


def wait_for_exit(stack: Stack, index: int, timeout_s: float = 120.0) -> int:
    worker = stack.workers[index]
    deadline = time.monotonic() + timeout_s
    while worker.poll() is None:
        if time.monotonic() > deadline:
            pytest.fail(f"worker {index} is still running:\n{stack.worker_log(index)}")
        time.sleep(0.3)
    assert worker.returncode is not None
    return worker.returncode


def test_a_worker_whose_table_was_built_with_another_half_life_exits_78_and_loses_nothing(stack: Stack) -> None:
    first = [click(f"a{i}", f"user-{i % 3}", 1_700_000_000 + i) for i in range(9)]
    stack.start_worker()
    stack.produce(first)
    stack.wait_for_events({e["event_id"] for e in first})
    stack.stop_worker(stack.workers[0])

    stack.start_worker(PROFILE_HALF_LIFE_S="3600")  # recovers the table built with 7 days
    late = stack.produce([click("late", "user-1", 1_700_000_100)])
    assert wait_for_exit(stack, 1) == 78
    log = stack.workers[1].log()
    assert "agent update_profiles crashed (IncompatibleProfile: profile 'user-1' was built with half-life " \
           "604800.0 s, settings say 3600.0 s; replay into a new app id to change it); exiting with code 78" in log
    assert stack.records(stack.settings.topic_dead_letters) == []  # nothing dead-lettered

    # With the right setting again, the event the refusing worker did not commit comes back and counts.
    stack.start_worker()
    deadline = time.monotonic() + 120
    while not any("late" in d["event_ids"] for d in stack.deltas()):
        assert stack.workers[2].poll() is None, stack.worker_log(2)
        assert time.monotonic() < deadline, f"'late' never reached a delta:\n{stack.worker_log(2)}"
        time.sleep(0.3)
    replicas = stack.replicas()
    assert replicas.gaps == []
    params = ProfileParams.from_settings(stack.settings)
    for user, state in replicas.profiles.items():
        events = [Event(e["event_id"], user, float(e["ts"]), "click", category="shoes", item_id="i")
                  for e in first + late if e["user_id"] == user]
        assert_view_matches(state.view(), expected_view(user, events, params))
