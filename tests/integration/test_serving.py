"""Serving: the delta topic materialised into a real redis-server (killed, stalled and restarted too), and
pseudonymised user ids."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from stream_app.core.pseudonym import pseudonym
from stream_app.kafka.embedded_broker import free_port
from stream_app.tools.sample_data import sample_events
from tests.integration.conftest import ROOT, Stack, eventually, http_get
from tests.oracle import assert_view_matches

pytestmark = pytest.mark.integration

STATS = re.compile(r"(\d+) deltas: (\d+) applied, (\d+) skipped, (\d+) resynced, (\d+) conflicts")


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A real, empty, non-persistent redis-server on a free loopback port."""
    port = free_port()
    log = (tmp_path / "redis.log").open("ab")
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"redis-server did not start:\n{(tmp_path / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=10)


def clicks_and_searches(customers: int) -> list[dict[str, Any]]:
    # Reviews are left out: their encoder is not part of what these tests are about.
    return [e for e in sample_events(customers=customers) if e["type"] in ("click", "search")]


def assert_same_profiles(actual: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert [p["user_id"] for p in actual] == [p["user_id"] for p in expected]
    for got, want in zip(actual, expected, strict=True):
        assert set(got) == set(want)
        assert got["version"] == want["version"], got["user_id"]
        assert got["embedding"] == want["embedding"]
        assert_view_matches(got, want, rel=1e-9)


def redis_views(stack: Stack, url: str, *args: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stack.cli("redis-get", "--redis", url, *args).splitlines() if line]


def final_stats(output: str) -> tuple[int, ...]:
    found = STATS.findall(output)
    assert found, output
    return tuple(int(n) for n in found[-1])


def test_redis_holds_exactly_the_snapshot_profiles(stack: Stack, redis_url: str) -> None:
    events = stack.produce(clicks_and_searches(customers=12))
    stack.start_worker()
    deltas = stack.wait_for_events({e["event_id"] for e in events})

    output = stack.cli("subscribe", "--redis", redis_url, "--until-caught-up", timeout_s=120)
    assert "caught up" in output
    n_deltas, applied, skipped, resynced, conflicts = final_stats(output)
    assert n_deltas == len(deltas) and applied + skipped == len(deltas) and resynced == conflicts == 0

    snapshot = stack.snapshot_cli()
    assert len(snapshot) == 12
    assert_same_profiles(redis_views(stack, redis_url), snapshot)
    at = max(e["ts"] for e in events) + 3 * 86400.0
    assert_same_profiles(redis_views(stack, redis_url, "--at", str(at)), stack.snapshot_cli("--at", str(at)))
    one = snapshot[3]["user_id"]
    assert redis_views(stack, redis_url, one) == [p for p in redis_views(stack, redis_url) if p["user_id"] == one]

    # Running it again with the same group finds nothing new; a new group gets every delta again and
    # applies none of them.
    assert final_stats(stack.cli("subscribe", "--redis", redis_url, "--until-caught-up"))[:3] == (0, 0, 0)
    again = final_stats(stack.cli("subscribe", "--redis", redis_url, "--until-caught-up", "--group", "second"))
    assert again[:3] == (len(deltas), 0, len(deltas))
    assert_same_profiles(redis_views(stack, redis_url), snapshot)

    # Redis loses a user; that user's next delta is a gap, and the user is rebuilt from the delta topic.
    lost = events[-1]["user_id"]
    store = redis.Redis.from_url(redis_url)
    try:
        assert store.delete(f"profile:{stack.settings.topic_deltas}:{lost}") == 1
    finally:
        store.close()
    late = {"event_id": "late-click", "user_id": lost, "ts": events[-1]["ts"] + 60, "type": "click", "item_id": "x"}
    stack.produce([late])
    stack.wait_for_events({"late-click"})
    n_deltas, applied, skipped, resynced, _ = final_stats(stack.cli("subscribe", "--redis", redis_url,
                                                                    "--until-caught-up"))
    assert (n_deltas, applied, skipped, resynced) == (1, 0, 0, 1)
    assert_same_profiles(redis_views(stack, redis_url), stack.snapshot_cli())


def start_subscriber(stack: Stack, redis_url: str, log: Path, **env: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:
        return subprocess.Popen([sys.executable, "-m", "stream_app.cli", "subscribe", "--redis", redis_url],
                                cwd=ROOT, env={**stack.env, **env}, stdout=handle, stderr=subprocess.STDOUT)


def test_a_subscriber_killed_mid_stream_resumes_without_loss_or_double_counting(
    stack: Stack, redis_url: str, tmp_path: Path
) -> None:
    events = clicks_and_searches(customers=40)
    chunks = [events[i:i + 8] for i in range(0, len(events), 8)]
    stack.start_worker()

    def trickle() -> None:
        for chunk in chunks:
            stack.produce(chunk)
            time.sleep(0.4)

    producer = threading.Thread(target=trickle)
    producer.start()
    store = redis.Redis.from_url(redis_url)
    first_log = tmp_path / "subscriber-1.log"
    first = start_subscriber(stack, redis_url, first_log)
    second: subprocess.Popen[bytes] | None = None
    second_log = tmp_path / "subscriber-2.log"
    try:
        deadline = time.monotonic() + 60
        while not store.keys("profile:*"):
            assert first.poll() is None, first_log.read_text()
            assert time.monotonic() < deadline, f"nothing reached Redis:\n{first_log.read_text()}"
            time.sleep(0.1)
        assert producer.is_alive(), "the events should still be flowing when the subscriber dies"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        at_kill = {key: int(store.hget(key, "version") or 0) for key in store.keys("profile:*")}

        second = start_subscriber(stack, redis_url, second_log)
        producer.join(timeout=120)
        deltas = stack.wait_for_events({e["event_id"] for e in events}, timeout_s=90)
        snapshot = stack.snapshot_cli()
        deadline = time.monotonic() + 90
        while True:
            try:
                assert_same_profiles(redis_views(stack, redis_url), snapshot)
                break
            except AssertionError:
                assert second.poll() is None, second_log.read_text()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0, second_log.read_text()
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        store.close()
    assert "stopped" in second_log.read_text()

    # Something was already there at the kill, and it was neither lost nor counted twice: the final state
    # equals the snapshot, and a full redelivery of every delta changes nothing.
    assert at_kill and sum(at_kill.values()) < sum(p["version"] for p in snapshot)
    again = final_stats(stack.cli("subscribe", "--redis", redis_url, "--until-caught-up", "--group", "audit"))
    assert again[:3] == (len(deltas), 0, len(deltas))
    assert_same_profiles(redis_views(stack, redis_url), snapshot)


def test_with_a_pseudonym_key_no_raw_user_id_leaves_the_worker(make_stack: Any, redis_url: str) -> None:
    key = "integration-test-pseudonym-key"
    stack = make_stack(PROFILE_PSEUDONYM_KEY=key)
    events = stack.produce(clicks_and_searches(customers=8))
    raw_ids = sorted({e["user_id"] for e in events})
    aliases = {raw: pseudonym(key.encode(), raw) for raw in raw_ids}
    stack.start_worker()
    stack.wait_for_events({e["event_id"] for e in events})

    records = stack.records(stack.settings.topic_deltas)
    assert records
    for record in records:
        assert orjson.loads(record.value)["user_id"] == record.key.decode()
        for raw in raw_ids:
            assert raw.encode() not in record.key and raw.encode() not in record.value
    snapshot = stack.snapshot_cli()
    assert [p["user_id"] for p in snapshot] == sorted(aliases.values())

    # Redis follows the deltas: keys and values carry pseudonyms only.
    stack.cli("subscribe", "--redis", redis_url, "--until-caught-up")
    assert_same_profiles(redis_views(stack, redis_url), snapshot)
    store = redis.Redis.from_url(redis_url)
    try:
        dump = b"".join(key + b"".join(store.hgetall(key).values()) for key in store.keys("*"))
        topic = stack.settings.topic_deltas
        assert sorted(store.keys("*")) == sorted(f"profile:{topic}:{a}".encode() for a in aliases.values())
    finally:
        store.close()
    assert not [raw for raw in raw_ids if raw.encode() in dump]
    assert redis_views(stack, redis_url, "--raw", raw_ids[0]) == [p for p in snapshot
                                                                  if p["user_id"] == aliases[raw_ids[0]]]

    # The HTTP lookup takes the real id (internal callers) and answers with the pseudonym.
    by_alias = {p["user_id"]: p for p in snapshot}

    def lookups_answer_with_pseudonyms() -> None:
        for raw in raw_ids:
            assert http_get(stack.web_ports[0], f"/profiles/{raw}") == (200, by_alias[aliases[raw]])

    eventually(lookups_answer_with_pseudonyms)
    status, body = http_get(stack.web_ports[0], "/profiles/nobody")
    assert status == 404 and body["user_id"] == pseudonym(key.encode(), "nobody")


class RedisServer:
    """A redis-server that can be stalled, killed and restarted on the same port with its data: every write
    is fsynced to the append-only file before Redis answers it (appendfsync always)."""

    def __init__(self, workdir: Path) -> None:
        self.port, self.dir = free_port(), workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        with (self.dir / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                 "--appendfsync", "always", "--dir", str(self.dir)], stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 20
        try:
            while True:
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"redis-server did not start:\n{(self.dir / 'redis.log').read_text()[-2000:]}")
                    time.sleep(0.05)
        finally:
            client.close()

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.kill()


def sink_metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:  # noqa: S310
        lines = response.read().decode().splitlines()
    return {line.split()[0]: float(line.split()[1]) for line in lines if line.startswith("profile_sink_")}


def test_redis_stalled_killed_and_restarted_mid_stream_ends_equal_to_the_snapshot(stack: Stack, tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    events = clicks_and_searches(customers=40)
    chunks = [events[i:i + 10] for i in range(0, len(events), 10)]
    assert len(chunks) >= 5
    stack.start_worker()
    metrics_port = free_port()
    log = tmp_path / "subscriber.log"
    subscriber = start_subscriber(stack, server.url, log, PROFILE_SINK_METRICS_PORT=str(metrics_port),
                                  PROFILE_REDIS_SOCKET_TIMEOUT_S="1", PROFILE_REDIS_CONNECT_TIMEOUT_S="1",
                                  PROFILE_SINK_BACKOFF_MAX_S="1")

    def metric(name: str) -> float:
        assert subscriber.poll() is None, log.read_text()
        return sink_metrics(metrics_port)[f"profile_sink_{name}_total"]

    def more_reconnects_than(before: float) -> Callable[[], None]:
        return lambda: assert_more(metric("reconnects"), before)

    try:
        # Phases instead of a timed trickle: each fault happens while deltas are arriving, whatever the load.
        stack.produce(chunks[0])
        eventually(lambda: assert_more(metric("applied"), 0), timeout_s=120, interval_s=0.2)

        # Stalled (SIGSTOP) with deltas arriving: the subscriber's reads time out instead of hanging; it retries.
        server.signal(signal.SIGSTOP)
        before = metric("reconnects")
        stack.produce(chunks[1])
        eventually(more_reconnects_than(before), timeout_s=90, interval_s=0.2)
        server.signal(signal.SIGCONT)

        # Killed (SIGKILL) with deltas (and a record that is not a delta) arriving, then restarted on the same
        # port with its append-only file.
        server.kill()
        before = metric("reconnects")
        stack.produce(chunks[2])
        stack.produce_raw(stack.settings.topic_deltas, b"junk-marker-51x", b"someone")
        stack.flush()
        eventually(more_reconnects_than(before), timeout_s=90, interval_s=0.2)
        server.start()

        for chunk in chunks[3:]:
            stack.produce(chunk)
        stack.wait_for_events({e["event_id"] for e in events}, timeout_s=120)
        snapshot = stack.snapshot_cli()
        assert len(snapshot) == 40

        def redis_equals_snapshot() -> None:
            assert subscriber.poll() is None, log.read_text()
            assert_same_profiles(redis_views(stack, server.url), snapshot)

        eventually(redis_equals_snapshot, timeout_s=120, interval_s=0.5)
        final = sink_metrics(metrics_port)
        subscriber.send_signal(signal.SIGTERM)
        assert subscriber.wait(timeout=30) == 0, log.read_text()
    finally:
        if subscriber.poll() is None:
            subscriber.kill()
            subscriber.wait()
        server.stop()
    assert final["profile_sink_reconnects_total"] >= 2
    assert final["profile_sink_malformed_total"] == 1
    assert final["profile_sink_foreign_total"] == final["profile_sink_unrepaired_total"] == 0
    output = log.read_text()
    assert "Timeout" in output and "retried" in output  # the stall was a timeout, logged
    assert "is not a delta (not JSON)" in output and "junk-marker-51x" not in output  # logged without payload
    assert "stopped" in output


def assert_more(now: float, before: float) -> None:
    assert now > before, (now, before)
