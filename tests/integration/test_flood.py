"""A flood of bad input: the worker's memory stays bounded and every message becomes a dead letter."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest

from stream_app.kafka.embedded_broker import EmbeddedBroker
from stream_app.worker.process import WorkerProcess
from tests.integration.conftest import Stack, eventually, http_get
from tests.integration.test_hostile import good_event, scrape

pytestmark = pytest.mark.integration

WARMUP = 5_000
FLOOD = 100_000
MAX_GROWTH_MB = 150
TRUNCATED_CLICK = b'{"event_id":"f","user_id":"u","ts":1700000000,"type":"click","item_id":"'  # + padding: bad JSON


def bad_messages(count: int, seed: int, limit: int) -> Iterator[bytes]:
    """Mostly small, one in ten a few KB, one in a hundred around the size limit (half of those over it)."""
    rng = random.Random(seed)
    for i in range(count):
        if i % 100 == 0:
            size = rng.randint(limit - 4_000, limit + 4_000)
        elif i % 10 == 0:
            size = rng.randint(2_000, 8_000)
        else:
            size = rng.randint(50, 500)
        shape = i % 4
        if shape == 0:
            yield TRUNCATED_CLICK + b"x" * size
        elif shape == 1:
            yield orjson.dumps({"event_id": f"f{i}", "user_id": "u", "ts": 1, "type": "click", "item_id": "i",
                                "pad": "x" * size})  # unknown field
        elif shape == 2:
            yield rng.randbytes(size)  # garbage
        else:
            yield orjson.dumps({"event_id": f"f{i}", "user_id": "u", "ts": "x" * size, "type": "search",
                                "query": "q"})  # wrong ts


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def produce_flood(stack: Stack, messages: Iterator[bytes]) -> int:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": stack.settings.bootstrap_servers[0], "linger.ms": 20,
                         "enable.idempotence": False, "queue.buffering.max.kbytes": 256 * 1024,
                         "message.max.bytes": 1024 * 1024})
    topics = [stack.settings.topic_clicks, stack.settings.topic_searches]
    sent = 0
    for value in messages:
        while True:
            try:
                producer.produce(topics[sent % 2], value=value)
                break
            except BufferError:
                producer.poll(0.05)
        sent += 1
        producer.poll(0)
    assert producer.flush(60) == 0
    return sent


def dead_letters_counted(stack: Stack) -> float:
    return sum(value for (name, _), value in scrape(stack).items() if name == "profile_dead_letters_total")


def wait_for_counted(stack: Stack, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while dead_letters_counted(stack) < count:
        assert stack.workers[0].poll() is None, stack.worker_log()
        assert time.monotonic() < deadline, f"only {dead_letters_counted(stack)} of {count} dead-lettered"
        time.sleep(0.5)


def count_dead_letters(stack: Stack, expected: int, timeout_s: float = 60.0) -> int:
    """Streams the dead-letter topic (values are not kept) and checks every record has its headers."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": stack.settings.bootstrap_servers[0], "group.id": "flood-count",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(stack.settings.topic_dead_letters, 0, OFFSET_BEGINNING)])
    seen = 0
    deadline = time.monotonic() + timeout_s
    try:
        while seen < expected and time.monotonic() < deadline:
            for record in consumer.consume(num_messages=2000, timeout=1.0):
                assert record.error() is None, record.error()
                headers = dict(record.headers() or [])
                assert headers["dlq.reason"] and headers["dlq.topic"] and headers["dlq.offset"]
                seen += 1
    finally:
        consumer.close()
    return seen


def _assert_ready(port: int) -> None:
    status, body = http_get(port, "/ready")
    assert status == 200, body


def settled_rss_mb(worker: WorkerProcess) -> float:
    """The worker's RSS once it is ready. The encoder loads in the background (~110 MB) and a click is profiled
    before it is resident: a baseline taken before that (seen with the suite run two tests at a time) charged the
    model to the flood, +165 MB."""
    eventually(lambda: _assert_ready(worker.web_port), timeout_s=120, interval_s=0.5)
    time.sleep(1.0)
    return rss_mb(worker.pid)


@contextmanager
def rss_samples(pid: int, interval_s: float) -> Iterator[list[float]]:
    """The process's RSS every `interval_s` while the block runs (a thread of its own)."""
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(rss_mb(pid))
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield samples
    finally:
        done.set()
        sampler.join()


def test_a_flood_of_bad_input_keeps_memory_bounded_and_is_fully_dead_lettered(stack: Stack) -> None:
    limit = stack.settings.max_event_bytes
    worker = stack.start_worker()
    stack.produce([good_event(0)])
    stack.wait_for_events({"good-0"})
    produce_flood(stack, bad_messages(WARMUP, seed=1, limit=limit))
    wait_for_counted(stack, WARMUP, timeout_s=60)
    baseline = settled_rss_mb(worker)
    started = time.monotonic()
    with rss_samples(worker.pid, interval_s=0.2) as samples:
        produce_flood(stack, bad_messages(FLOOD, seed=2, limit=limit))
        wait_for_counted(stack, WARMUP + FLOOD, timeout_s=300)
    elapsed = time.monotonic() - started
    after = rss_mb(worker.pid)
    peak = max(samples)
    print(f"flood of {FLOOD} bad messages: {elapsed:.1f} s; RSS after warm-up {baseline:.0f} MB, "
          f"peak {peak:.0f} MB, after {after:.0f} MB")
    assert peak - baseline < MAX_GROWTH_MB
    assert after - baseline < MAX_GROWTH_MB

    assert count_dead_letters(stack, WARMUP + FLOOD) == WARMUP + FLOOD
    assert worker.poll() is None
    late = stack.produce([good_event(1)])
    stack.wait_for_events({late[0]["event_id"]})


BIG_FLOOD = 10_000
BIG_RECORD = 60_000  # under PROFILE_MAX_EVENT_BYTES (64 KiB): these are refused for their content, not their size
BUDGET = 1024 * 1024
MAX_BIG_GROWTH_MB = 150


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[Stack]:
    """A broker of its own: the flood and its dead letters (1.2 GB, kept in the broker's memory) go when it stops."""
    with EmbeddedBroker(log_path=str(tmp_path / "tansu.log")) as broker:
        deployment = Stack(broker, tmp_path / "stack", PROFILE_BUFFER_MAX_BYTES=str(BUDGET))
        try:
            yield deployment
        finally:
            deployment.close()


def test_a_flood_of_records_near_the_size_limit_holds_no_more_than_the_byte_budget(own_stack: Stack) -> None:
    """The worker's RSS rises with what it buffers, and the allocator keeps some of what churned through it, more
    under load. By count alone (20,000 records buffered) 4,000 of these 60 KB records raised it by 132 MB, 30,000 by
    757 MB (2-core EPYC); with a 1 MiB budget 4,000 raised it by 43 MB alone and 77 MB with the suite's other
    process beside it, and 30,000 by 78 MB. So 10,000 here, against a limit between the two. Every record is still
    dead-lettered, and the worker still counts good events."""
    stack = own_stack
    worker = stack.start_worker()
    stack.produce([good_event(0)])
    stack.wait_for_events({"good-0"})
    baseline = settled_rss_mb(worker)
    with rss_samples(worker.pid, interval_s=0.1) as samples:
        produce_flood(stack, (TRUNCATED_CLICK + b"x" * BIG_RECORD for _ in range(BIG_FLOOD)))  # near the limit
        wait_for_counted(stack, BIG_FLOOD, timeout_s=300)
    peak = max(samples)
    print(f"{BIG_FLOOD} bad records of {BIG_RECORD} B: RSS after warm-up {baseline:.0f} MB, peak {peak:.0f} MB")
    assert peak - baseline < MAX_BIG_GROWTH_MB

    assert count_dead_letters(stack, BIG_FLOOD) == BIG_FLOOD
    late = stack.produce([good_event(1)])
    stack.wait_for_events({late[0]["event_id"]})
