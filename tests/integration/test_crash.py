"""Crash safety: SIGKILL workers at random points of a real-derived stream and compare with a clean run.

The reference is docs/semantics.md's profile definition evaluated in-process over the same events (tests/oracle.py),
i.e. what one uninterrupted worker would compute. After the kills the three views of the state must agree
with it: the profiles rebuilt from deltas, the worker's table (its changelog) and the per-event bookkeeping.
"""

from __future__ import annotations

import asyncio
import random
import re
import signal
import time
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import pytest

from schemas.events import validate_event
from stream_app.core.profile import ProfileParams
from stream_app.core.replica import ProfileReplicas
from stream_app.kafka.reading import end_offsets
from stream_app.tools.sample_data import sample_events
from tests.integration.conftest import Stack
from tests.oracle import assert_view_matches, expected_view

pytestmark = pytest.mark.integration

SEED = 20240611


def click_search_events(customers: int) -> list[dict[str, Any]]:
    return [e for e in sample_events(customers=customers) if e["type"] in ("click", "search")]


def chunks(events: Sequence[dict[str, Any]], count: int) -> Iterator[list[dict[str, Any]]]:
    size = -(-len(events) // count)
    for start in range(0, len(events), size):
        yield list(events[start:start + size])


class DeltaTail:
    """Follows the deltas topic, so that a kill can be timed to 'the worker has just published'."""

    def __init__(self, stack: Stack) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        self._consumer = Consumer({
            "bootstrap.servers": stack.settings.bootstrap_servers[0], "group.id": f"tail-{stack.settings.app_id}",
            "enable.auto.commit": False, "fetch.wait.max.ms": 10, "fetch.error.backoff.ms": 10,
        })
        topic = stack.settings.topic_deltas
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(stack.settings.partitions)])
        self.count = 0

    def wait_for_new(self, timeout_s: float, process: Any = None) -> None:
        """Return as soon as at least one delta newer than the last call arrived."""
        seen = self.count
        deadline = time.monotonic() + timeout_s
        while self.count == seen:
            for message in self._consumer.consume(num_messages=1000, timeout=0.02):
                if message.error() is None:
                    self.count += 1
            if process is not None and process.poll() is not None:
                pytest.fail(f"worker exited with {process.returncode} before publishing")
            if time.monotonic() > deadline:
                pytest.fail(f"no new delta within {timeout_s} s")

    def close(self) -> None:
        self._consumer.close()


def assigned(stack: Stack, worker: int) -> set[int]:
    """The by-user partitions a worker was last assigned, from the assignment aiokafka logs at INFO."""
    log = (stack.workdir / f"worker-{worker}.log").read_text(errors="replace")
    assignments = re.findall(r"Setting newly assigned partitions (.*)", log)
    if not assignments:
        return set()
    topic = re.escape(stack.settings.topic_events_by_user)
    return {int(p) for p in re.findall(rf"TopicPartition\(topic='{topic}', partition=(\d+)\)", assignments[-1])}


def wait_until(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s} s: {what}")
        time.sleep(0.2)


def kill_delay(rng: random.Random) -> float:
    """Seconds between 'a delta just arrived' and SIGKILL.

    Mostly at once, i.e. while the rest of that micro-batch's table writes and deltas are in flight; sometimes
    later, when the next batches or an offset commit (every 2.8 s) may be under way.
    """
    return rng.choice([0.0, 0.0, rng.uniform(0.0, 0.05), rng.uniform(0.05, 0.5), rng.uniform(0.5, 3.0)])


def assert_matches_clean_run(stack: Stack, events: list[dict[str, Any]]) -> None:
    params = ProfileParams.from_settings(stack.settings)
    parsed = [validate_event(e, max_text_chars=stack.settings.max_text_chars) for e in events]
    by_user: dict[str, list[Any]] = {}
    for event in parsed:
        by_user.setdefault(event.user_id, []).append(event)
    expected = {user: expected_view(user, user_events, params) for user, user_events in by_user.items()}

    deltas = stack.deltas()
    replicas = ProfileReplicas().apply_all(deltas)
    table = stack.table()
    print(f"{len(events)} events of {len(expected)} users: {len(deltas)} deltas, "
          f"{replicas.duplicates} of them re-emitted copies")

    # (a) Profiles rebuilt from the deltas, as a subscriber sees them.
    assert set(replicas.profiles) == set(expected)
    for user, state in replicas.profiles.items():
        assert_view_matches(state.view(), expected[user])
    # (b) The worker's table as its changelog holds it (what a restarted worker recovers).
    assert set(table) == set(expected)
    for user, state in table.items():
        assert_view_matches(state.view(), expected[user])
        assert state.version == replicas.profiles[user].version, user

    # (c) No version gaps, and every event counted by exactly one version of its user: a re-emitted delta is
    # an identical copy, never a second delta under a version number that is already taken.
    assert replicas.gaps == []
    by_version: dict[tuple[str, int], bytes] = {}
    counted_in: dict[str, set[tuple[str, int]]] = {}
    for delta in deltas:
        key = (delta["user_id"], delta["version"])
        encoded = orjson.dumps(delta, option=orjson.OPT_SORT_KEYS)
        assert by_version.setdefault(key, encoded) == encoded, f"two different deltas for {key}"
        for event_id in delta["event_ids"]:
            counted_in.setdefault(event_id, set()).add(key)
    assert set(counted_in) == {e["event_id"] for e in events}
    assert {eid: keys for eid, keys in counted_in.items() if len(keys) > 1} == {}
    for user, state in table.items():
        assert sorted(state.seen) == sorted(e.event_id for e in by_user[user])
        assert all(state.seen[eid] in {v for _, v in counted_in[eid]} for eid in state.seen)
    # Counted once, overall: the decayed event count, read at one common time, is that of the distinct events.
    at = max(e.ts for e in parsed)
    activity = sum(v for state in replicas.profiles.values() for v in state.view(at)["activity"].values())
    assert len({e.event_id for e in parsed}) == len(parsed)
    assert activity == pytest.approx(sum(2.0 ** ((e.ts - at) / params.half_life_s) for e in parsed), rel=1e-9)


def test_sigkill_at_random_points_loses_and_double_counts_nothing(stack: Stack) -> None:
    sigkill_at_random_points(stack, random.Random(SEED))


def test_sigkill_while_the_ingest_agent_folds_loses_and_double_counts_nothing(make_stack: Any) -> None:
    # Keyed by user with the Java partitioner, input topics as wide as the by-user topic: no event takes the hop.
    stack = make_stack(PROFILE_INPUT_PARTITIONS="3")
    stack.partitioner = "murmur2_random"
    sigkill_at_random_points(stack, random.Random(SEED + 2))
    by_user = asyncio.run(end_offsets(stack.settings, [stack.settings.topic_events_by_user]))
    assert len(by_user) == 3 and set(by_user.values()) == {0}


def sigkill_at_random_points(stack: Stack, rng: random.Random) -> None:
    events = click_search_events(customers=700)
    assert len(events) > 2500
    pending = list(chunks(events, 10))
    tail = DeltaTail(stack)
    produced: list[dict[str, Any]] = []
    try:
        worker = stack.start_worker()
        for _kill in range(4):
            produced += stack.produce(pending.pop(0))
            tail.wait_for_new(timeout_s=60, process=worker)  # a micro-batch is being published
            time.sleep(kill_delay(rng))
            stack.stop_worker(worker, signal.SIGKILL)
            produced += stack.produce(pending.pop(0))  # a backlog for the next worker's first batches
            worker = stack.start_worker()
        while pending:
            produced += stack.produce(pending.pop(0))
        assert len(produced) == len(events)
        stack.wait_for_events({e["event_id"] for e in events}, timeout_s=120)
    finally:
        tail.close()
    assert_matches_clean_run(stack, events)


# Before stream_app/worker/commit_safety.py, 2 of 23 runs lost events here: Faust dropped records fetched
# again after the survivor's seek and committed past them.
def test_survivor_takes_over_the_partitions_of_a_killed_worker(stack: Stack) -> None:
    rng = random.Random(SEED + 1)
    events = click_search_events(customers=500)
    pending = list(chunks(events, 6))
    tail = DeltaTail(stack)
    try:
        doomed = stack.start_worker()
        survivor = stack.start_worker()
        stack.produce(pending.pop(0))
        tail.wait_for_new(timeout_s=60)
        wait_until(lambda: assigned(stack, 0) and assigned(stack, 1), 60, "both workers own partitions")
        stack.produce(pending.pop(0))
        tail.wait_for_new(timeout_s=60)
        time.sleep(kill_delay(rng))
        stack.stop_worker(doomed, signal.SIGKILL)
        while pending:
            stack.produce(pending.pop(0))
        # The dead member keeps its partitions until the broker's session timeout evicts it (~6 s on the
        # embedded broker), then the survivor recovers their table partitions and reprocesses from the commit.
        stack.wait_for_events({e["event_id"] for e in events}, timeout_s=120)
        assert survivor.poll() is None
        assert assigned(stack, 1) == set(range(stack.settings.partitions))
    finally:
        tail.close()
    assert_matches_clean_run(stack, events)


def test_a_worker_not_told_about_the_embedded_broker_detects_it_and_survives_sigkill(stack: Stack) -> None:
    # Started as a new user would next to `stream-app broker`: without PROFILE_EMBEDDED_BROKER. Without the
    # work-arounds a restarted worker waited minutes for its group and recovered its table short of the end.
    rng = random.Random(SEED + 2)
    events = click_search_events(customers=300)
    pending = list(chunks(events, 5))
    tail = DeltaTail(stack)
    try:
        worker = stack.start_worker(PROFILE_EMBEDDED_BROKER="false")
        for _kill in range(2):
            stack.produce(pending.pop(0))
            tail.wait_for_new(timeout_s=60, process=worker)
            time.sleep(kill_delay(rng))
            stack.stop_worker(worker, signal.SIGKILL)
            stack.produce(pending.pop(0))
            worker = stack.start_worker(PROFILE_EMBEDDED_BROKER="false")
        while pending:
            stack.produce(pending.pop(0))
        stack.wait_for_events({e["event_id"] for e in events}, timeout_s=120)
        stack.stop_worker(worker)  # SIGTERM: its log is complete (a SIGKILLed one may lose buffered lines)
    finally:
        tail.close()
    assert "it is the embedded Tansu broker" in (stack.workdir / "worker-2.log").read_text(errors="replace")
    assert_matches_clean_run(stack, events)
