"""Soak: one worker at a steady click/search rate for minutes; memory and lag must stay bounded.

`make soak` runs it (SOAK_DURATION_S, default 180; SOAK_RATE events/s, default 2000). Every
SOAK_INTERVAL_S (5) it records deltas/s, events/s reaching deltas, consumer lag (input end offsets minus
the worker group's committed offsets), p99 produce-to-delta latency and the worker's RSS, prints a table
and writes bench/soak-results.json.

The events are the real-derived clicks and searches of SOAK_CUSTOMERS CDNOW customers, replayed round
after round with fresh event ids and event times moved on by the data's span, so every user keeps getting
new events. A profile's size is bounded (top-K interests and keywords, the last PROFILE_DEDUP_WINDOW event
ids, the last PROFILE_REDELIVERY_WINDOW deltas); the soak uses a dedup window of 32 so that every profile
reaches its bound within the warm-up, and any later growth of the worker's memory is a leak.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import pytest

from bench.harness import ROOT, follow_deltas, new_deployment, percentile, produce, rss_bytes
from stream_app.kafka.embedded_broker import EmbeddedBroker
from stream_app.kafka.tansu_workarounds import true_end_offsets
from stream_app.ops.settings import Settings
from stream_app.tools.sample_data import sample_events
from stream_app.worker.process import Deployment

pytestmark = pytest.mark.slow

DURATION_S = float(os.environ.get("SOAK_DURATION_S", "180"))
RATE = float(os.environ.get("SOAK_RATE", "2000"))
INTERVAL_S = float(os.environ.get("SOAK_INTERVAL_S", "5"))
CUSTOMERS = int(os.environ.get("SOAK_CUSTOMERS", "1000"))
# Allowed RSS growth from the second to the last quarter of the run (besides 2 %: allocator noise).
RSS_MARGIN_MIB = float(os.environ.get("SOAK_RSS_MARGIN_MIB", "6"))
# Allowed consumer lag, in seconds of input (offsets are committed every 2.8 s, so ~3 s is normal).
MAX_LAG_S = float(os.environ.get("SOAK_MAX_LAG_S", "15"))
RESULTS = ROOT / "bench" / "soak-results.json"


@dataclass
class Sample:
    t_s: float
    produced_per_s: float
    deltas_per_s: float
    events_per_s: float
    p99_latency_ms: float
    lag: int
    worker_rss_mib: float
    broker_rss_mib: float


def replayed(base: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """`base` round after round, forever, with fresh event ids and event times moved on by its span and a day."""
    span = max(e["ts"] for e in base) - min(e["ts"] for e in base) + 86400.0
    for round_ in itertools.count():
        for event in base:
            yield {**event, "event_id": f"{event['event_id']}-r{round_}", "ts": event["ts"] + round_ * span}


def steady_events(customers: int) -> Iterator[dict[str, Any]]:
    return replayed([e for e in sample_events(customers=customers) if e["type"] in ("click", "search")])


class LagProbe:
    """Input end offsets minus the offsets the worker's consumer group committed."""

    def __init__(self, settings: Settings, topics: tuple[str, ...]) -> None:
        from aiokafka.structs import TopicPartition

        from stream_app.kafka.clients import consumer

        self.settings = settings
        self.client = consumer(settings, group_id=settings.app_id)
        self.tps = [TopicPartition(topic, p) for topic in topics for p in range(settings.input_partitions)]

    async def start(self) -> None:
        await self.client.start()

    async def lag(self) -> int:
        # ListOffsets is one batch short on the embedded broker; fetch high watermarks are not.
        ends = await true_end_offsets(self.settings.bootstrap_servers, await self.client.end_offsets(self.tps))
        committed = [await self.client.committed(tp) or 0 for tp in self.tps]
        return sum(ends[tp] - offset for tp, offset in zip(self.tps, committed, strict=True))

    async def stop(self) -> None:
        await self.client.stop()


async def soak(deployment: Deployment, worker_pid: int, broker_pid: int, events: Iterator[dict[str, Any]], *,
               rate: float, duration_s: float, input_topics: tuple[str, ...]) -> list[Sample]:
    """Send `events` at `rate` for `duration_s`, sampling every INTERVAL_S while the deltas arrive."""
    settings = deployment.settings
    sent_at: dict[str, float] = {}
    producer = asyncio.create_task(produce(settings, events, rate=rate, sent_at=sent_at))
    probe = LagProbe(settings, input_topics)
    await probe.start()
    samples: list[Sample] = []
    follower = follow_deltas(settings)
    started = window_start = time.perf_counter()
    produced_before = 0
    deltas = covered = 0
    latencies: list[float] = []
    try:
        async for fetched in follower:
            for arrival, ids in fetched:
                deltas += 1
                for event_id in ids:
                    sent = sent_at.pop(event_id, None)  # None: a re-emitted delta's events, counted already
                    if sent is not None:
                        latencies.append(arrival - sent)
                        covered += 1
            if producer.done():
                producer.result()  # re-raises what stopped it
                pytest.fail("the producer stopped early")
            now = time.perf_counter()
            if now - window_start < INTERVAL_S:
                continue
            produced = len(sent_at) + covered  # handed to Kafka so far: waiting for a delta, or covered
            elapsed = now - window_start
            samples.append(Sample(
                t_s=round(now - started, 1),
                produced_per_s=(produced - produced_before) / elapsed,
                deltas_per_s=deltas / elapsed,
                events_per_s=len(latencies) / elapsed,
                p99_latency_ms=percentile(latencies, 99) * 1000,
                lag=await probe.lag(),
                worker_rss_mib=rss_bytes(worker_pid) / 2**20,
                broker_rss_mib=rss_bytes(broker_pid) / 2**20,
            ))
            # Counted up to `now`: what arrives while the lag is probed belongs to the next window.
            produced_before, deltas, latencies, window_start = produced, 0, [], now
            if now - started >= duration_s:
                return samples
    finally:
        producer.cancel()
        await follower.aclose()
        await probe.stop()
    raise AssertionError("unreachable: the delta follower never ends")


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in points) / spread if spread else 0.0


def rss_quarters(samples: list[Sample], duration_s: float) -> tuple[list[float], list[float]]:
    """The worker's RSS samples in the second and in the last quarter of the run."""
    return ([s.worker_rss_mib for s in samples if duration_s / 4 < s.t_s <= duration_s / 2],
            [s.worker_rss_mib for s in samples if s.t_s > 3 * duration_s / 4])


def assert_rss_levels_off(samples: list[Sample], duration_s: float, margin_mib: float) -> None:
    second_quarter, last_quarter = rss_quarters(samples, duration_s)
    assert max(last_quarter) <= max(second_quarter) * 1.02 + margin_mib, (second_quarter, last_quarter)


def print_samples(samples: list[Sample]) -> None:
    columns = ("t s", "sent/s", "deltas/s", "events/s", "p99 ms", "lag", "RSS MiB", "broker")
    print("\n" + " ".join(f"{name:>8}" for name in columns))
    for s in samples:
        print(f"{s.t_s:8.0f} {s.produced_per_s:8.0f} {s.deltas_per_s:8.0f} {s.events_per_s:8.0f} "
              f"{s.p99_latency_ms:8.0f} {s.lag:8d} {s.worker_rss_mib:8.1f} {s.broker_rss_mib:8.1f}")


def test_memory_and_lag_stay_bounded_at_a_steady_rate() -> None:
    with EmbeddedBroker() as broker:
        # Rounds move event time on by the data's span (~1.5 years each), decades past today: lift the
        # future-timestamp rule, which would otherwise dead-letter them (docs/hostile-input.md: bad clocks).
        deployment = new_deployment(broker, PROFILE_DEDUP_WINDOW="32", PROFILE_MAX_FUTURE_S="7258118400")
        try:
            worker = deployment.start_worker()
            settings = deployment.settings
            samples = asyncio.run(soak(deployment, worker.pid, broker.pid, steady_events(CUSTOMERS), rate=RATE,
                                       duration_s=DURATION_S,
                                       input_topics=(settings.topic_clicks, settings.topic_searches)))
            assert worker.poll() is None, f"worker exited with {worker.returncode}"
        finally:
            deployment.stop()

    print_samples(samples)

    second_half = [s for s in samples if s.t_s > DURATION_S / 2]
    rss_slope = slope_per_min([(s.t_s, s.worker_rss_mib) for s in second_half])
    summary = {
        "duration_s": DURATION_S, "rate": RATE, "customers": CUSTOMERS, "dedup_window": 32,
        "events_per_s": sum(s.events_per_s for s in second_half) / len(second_half),
        "deltas_per_s": sum(s.deltas_per_s for s in second_half) / len(second_half),
        "p99_latency_ms_max": max(s.p99_latency_ms for s in second_half),
        "p99_latency_ms_median": percentile([s.p99_latency_ms for s in second_half], 50),
        "lag_max_second_half": max(s.lag for s in second_half),
        "worker_rss_mib_first": samples[0].worker_rss_mib, "worker_rss_mib_last": samples[-1].worker_rss_mib,
        "worker_rss_slope_mib_per_min_second_half": rss_slope,
        "broker_rss_mib_first": samples[0].broker_rss_mib, "broker_rss_mib_last": samples[-1].broker_rss_mib,
    }
    RESULTS.write_text(json.dumps({"summary": summary, "samples": [asdict(s) for s in samples]}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))

    assert len(second_half) >= 3
    # Memory: once every profile is at its bound (first quarter: warm-up), the worker's RSS stays flat. A leak
    # of 50 bytes per event would add ~9 MiB between the second and the last quarter of a 3-minute run.
    assert_rss_levels_off(samples, DURATION_S, RSS_MARGIN_MIB)
    # Lag: bounded, and not climbing sample after sample.
    assert summary["lag_max_second_half"] < MAX_LAG_S * RATE
    lags = [s.lag for s in second_half]
    assert any(later <= earlier for earlier, later in itertools.pairwise(lags)), f"lag only grows: {lags}"
