"""Produce → delta latency at steady rates, with the per-stage breakdown of an instrumented worker.

One worker (`python -m bench.stages`: the normal worker with timing wrappers, see bench/stages.py) on real-
derived clicks and searches; events are produced at a steady rate, and each event's latency is its delta
record's create time minus the wall time its input record was handed to the producer (both wall clock,
ms resolution on the delta side). The worker's own stage stamps give where that time went, and /proc gives
CPU per thread over the phase.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from bench import stages
from bench.harness import new_deployment, percentile, produce, wait_ready
from stream_app.kafka.clients import consumer
from stream_app.kafka.embedded_broker import EmbeddedBroker
from stream_app.ops.settings import Settings
from stream_app.worker.process import Deployment, WorkerProcess


class StagedWorker(WorkerProcess):
    """A worker whose entry point is bench.stages (instrumented) instead of `stream-app worker`."""

    def start(self) -> StagedWorker:
        import subprocess

        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603 - our own entry point
                [sys.executable, "-m", "bench.stages"], env=self.env, cwd=self.cwd, stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self


def start_staged_worker(deployment: Deployment, **overrides: str) -> tuple[StagedWorker, Path]:
    stages_file = deployment.workdir / "stages.json"
    env = {**deployment.env, "PROFILE_DATA_DIR": str(deployment.workdir / "faust-staged"),
           "BENCH_STAGES_FILE": str(stages_file), **overrides}
    worker = StagedWorker(env, deployment.workdir / "worker-staged.log").start()
    deployment.workers.append(worker)
    return worker, stages_file


async def produce_at(settings: Settings, events: list[dict[str, Any]], rate: float) -> dict[str, float]:
    """Send at a steady rate; event id -> wall time (time.time()) at hand-off, the clock record timestamps use."""
    return await produce(settings, events, rate, clock=time.time, linger_ms=0)


async def delta_times(settings: Settings, wanted: set[str], timeout_s: float) -> dict[str, float]:
    """Event id -> create time (s) of the delta that counted it, for every wanted event."""
    from aiokafka.structs import TopicPartition

    client = consumer(settings, fetch_max_wait_ms=20, max_partition_fetch_bytes=4 * 1024 * 1024)
    await client.start()
    found: dict[str, float] = {}
    try:
        tps = [TopicPartition(settings.topic_deltas, p) for p in range(settings.partitions)]
        client.assign(tps)
        await client.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        while len(found) < len(wanted):
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(found)} of {len(wanted)} events reached a delta")
            batch = await client.getmany(timeout_ms=100, max_records=10_000)
            for records in batch.values():
                for record in records:
                    for event_id in orjson.loads(record.value)["event_ids"]:
                        if event_id in wanted:
                            found.setdefault(event_id, record.timestamp / 1000)
    finally:
        await client.stop()
    return found


async def _phase(settings: Settings, events: list[dict[str, Any]],
                 rate: float) -> tuple[dict[str, float], dict[str, float]]:
    wanted = {e["event_id"] for e in events}
    tail = asyncio.create_task(delta_times(settings, wanted, timeout_s=120 + len(events) / rate))
    sent = await produce_at(settings, events, rate)
    return sent, await tail


def steady(deployment: Deployment, worker: WorkerProcess, stages_file: Path, events: list[dict[str, Any]],
           rate: float) -> dict[str, Any]:
    stages.request_summary(stages_file, reset=True)
    cpu_before = stages.thread_cpu(worker.pid)
    started = time.perf_counter()
    sent, delivered = asyncio.run(_phase(deployment.settings, events, rate))
    seconds = time.perf_counter() - started
    cpu_after = stages.thread_cpu(worker.pid)
    summary = stages.request_summary(stages_file, reset=True)
    latencies = [delivered[eid] - sent[eid] for eid in sent]
    count = len(events)
    threads = {name: round(1e6 * (cpu_after.get(name, 0.0) - cpu_before.get(name, 0.0)) / count, 1)
               for name in cpu_after}
    cpu_parts = {part: round(1e6 * summary["cpu_s"].get(part, 0.0) / count, 1) for part in stages.CPU_PARTS}
    return {
        "rate": rate, "events": count, "seconds": round(seconds, 1),
        "latency_p50_ms": round(1000 * percentile(latencies, 50), 1),
        "latency_p99_ms": round(1000 * percentile(latencies, 99), 1),
        "latency_max_ms": round(1000 * max(latencies), 1),
        "stages_ms": summary["stages"],
        "cpu_us_per_event_by_part": cpu_parts,
        "cpu_us_per_event_by_thread": {k: v for k, v in sorted(threads.items(), key=lambda kv: -kv[1]) if v > 0},
        "cpu_us_per_event_worker": round(sum(threads.values()), 1),
    }


def run(broker: EmbeddedBroker, events: list[dict[str, Any]], rates: tuple[float, ...] = (500, 2000),
        seconds: float = 20, **overrides: str) -> dict[str, Any]:
    """Each rate for `seconds`, on fresh slices of `events` (no event is sent twice), one worker for all."""
    deployment = new_deployment(broker, PROFILE_ENCODER_PRELOAD="false", **overrides)
    try:
        worker, stages_file = start_staged_worker(deployment)
        wait_ready(deployment, timeout_s=120)
        offset = 0
        warm = events[offset: offset + 500]
        offset += len(warm)
        steady(deployment, worker, stages_file, warm, 250)  # joins, first fetches, code paths warm
        results = {}
        for rate in rates:
            count = int(rate * seconds)
            if offset + count > len(events):
                raise ValueError(f"not enough events for {rate}/s x {seconds} s")
            results[str(int(rate))] = steady(deployment, worker, stages_file, events[offset: offset + count], rate)
            offset += count
        return {"overrides": overrides, "rates": results}
    finally:
        deployment.stop()


if __name__ == "__main__":
    from bench.click_search import click_search_events

    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    with EmbeddedBroker() as running:
        print(orjson.dumps(run(running, click_search_events(), seconds=float(sys.argv[1]) if len(sys.argv) > 1
                               else 20), option=orjson.OPT_INDENT_2).decode())
