"""Bench plumbing: an embedded broker, worker subprocesses, a producer at a given rate, a delta tail."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson

from stream_app.kafka.clients import consumer, producer
from stream_app.kafka.embedded_broker import EmbeddedBroker
from stream_app.ops.settings import Settings
from stream_app.worker.process import Deployment

ROOT = Path(__file__).resolve().parents[1]


def new_deployment(broker: EmbeddedBroker, **overrides: str) -> Deployment:
    """A deployment of its own on the bench's broker, in a fresh temporary folder."""
    tag = uuid.uuid4().hex[:6]
    return Deployment(broker.url, Path(tempfile.mkdtemp(prefix=f"bench-{tag}-")), prefix="bench", **overrides)


def wait_ready(deployment: Deployment, timeout_s: float, poll_s: float = 0.2) -> None:
    """Until every worker answers 200 on GET /ready (joined, tables recovered, encoder loaded)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    for process, port in zip(deployment.workers, deployment.web_ports, strict=True):
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"worker exited with {process.returncode}; see {deployment.workdir}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as response:  # noqa: S310
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker on port {port} not ready after {timeout_s} s")
            time.sleep(poll_s)


async def produce(
    settings: Settings, events: Iterable[dict[str, Any]], rate: float | None = None,
    sent_at: dict[str, float] | None = None, *, clock: Callable[[], float] = time.perf_counter, linger_ms: int = 2,
) -> dict[str, float]:
    """Send events (at `rate` per second if given); returns event_id -> `clock()` when it was handed to Kafka.

    Pass `sent_at` to watch it fill while sending (the soak test measures latency as it goes).
    """
    client = producer(settings, linger_ms=linger_ms)
    await client.start()
    sent_at = {} if sent_at is None else sent_at
    try:
        started = time.perf_counter()
        pending = []
        for index, event in enumerate(events):
            if rate is not None:
                due = started + index / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            pending.append(await client.send(settings.topic_for(event["type"]), orjson.dumps(event),
                                             key=event["user_id"].encode()))
            sent_at[event["event_id"]] = clock()
            if len(pending) > 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await client.stop()
    return sent_at


async def follow_deltas(settings: Settings, *, fetch_max_wait_ms: int = 20, create_time: bool = False,
                        ) -> AsyncGenerator[list[tuple[float, list[str]]], None]:
    """From the beginning of the deltas topic, forever: (time, event ids) per delta, per fetch.

    The time is `time.perf_counter()` at arrival here, or with `create_time` the delta record's create time
    (`time.time()` seconds, stamped by the worker's producer): then how often this reader polls does not
    matter, so a long `fetch_max_wait_ms` can spare the shared cores (the embedded broker holds a fetch that
    finds nothing for the whole wait, and answers each poll with CPU the measured worker would use).
    Yields every ~100 ms, an empty list when nothing arrived, so callers can check their deadlines.
    """
    from aiokafka.structs import TopicPartition

    client = consumer(settings, fetch_max_wait_ms=fetch_max_wait_ms, max_partition_fetch_bytes=4 * 1024 * 1024)
    await client.start()
    try:
        tps = [TopicPartition(settings.topic_deltas, p) for p in range(settings.partitions)]
        client.assign(tps)
        await client.seek_to_beginning(*tps)
        while True:
            batch = await client.getmany(timeout_ms=100, max_records=10_000)
            now = time.perf_counter()
            yield [(record.timestamp / 1000 if create_time else now, orjson.loads(record.value)["event_ids"])
                   for records in batch.values() for record in records]
    finally:
        await client.stop()


async def tail_deltas(settings: Settings, expected_events: int, timeout_s: float, *, fetch_max_wait_ms: int = 20,
                      create_time: bool = False) -> list[tuple[float, list[str]]]:
    """(time, event ids) of every delta, as `follow_deltas` gives them, until `expected_events` distinct
    events are covered."""
    arrivals: list[tuple[float, list[str]]] = []
    covered: set[str] = set()
    deadline = time.monotonic() + timeout_s
    follower = follow_deltas(settings, fetch_max_wait_ms=fetch_max_wait_ms, create_time=create_time)
    try:
        async for fetched in follower:
            arrivals.extend(fetched)
            for _, ids in fetched:
                covered.update(ids)
            if len(covered) >= expected_events:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(covered)} of {expected_events} events reached a delta")
    finally:
        await follower.aclose()
    return arrivals


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User+system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]
