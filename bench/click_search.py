"""Click/search path: events/s of one worker on a pre-loaded backlog of real-derived events, and of the
hand-written reference loop (bench/reference_loop.py) on the very same records, right after, on the same broker."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

from bench import reference_loop
from bench.harness import cpu_seconds, follow_deltas, new_deployment, produce, wait_ready
from stream_app.kafka.embedded_broker import EmbeddedBroker
from stream_app.ops.settings import Settings
from stream_app.tools.sample_data import sample_events
from stream_app.worker.process import Deployment, WorkerProcess


def click_search_events(limit: int | None = None) -> list[dict[str, Any]]:
    """All CDNOW purchases as clicks plus Women's review titles as searches (see docs/sample-data.md)."""
    events = [e for e in sample_events(customers=30_000, reviews_per_customer=1) if e["type"] != "review"]
    return events[:limit] if limit is not None else events


async def _tail_with_cpu(settings: Settings, expected: int, pids: tuple[int, int], worker: WorkerProcess,
                         timeout_s: float = 600) -> tuple[list[tuple[float, list[str]]], tuple[float, float]]:
    """Deltas until `expected` events are covered, and each pid's CPU seconds from now (the worker has just
    become ready, so its start-up, imports and group join are not charged to the events) to the last delta."""
    arrivals: list[tuple[float, list[str]]] = []
    covered: set[str] = set()
    start_cpu = [cpu_seconds(pid) for pid in pids]
    deadline = time.monotonic() + timeout_s
    follower = follow_deltas(settings)
    try:
        async for fetched in follower:
            arrivals.extend(fetched)
            for _, ids in fetched:
                covered.update(ids)
            if len(covered) >= expected:
                break
            worker.check_alive()  # a crashed worker fails the bench now, not after the timeout
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(covered)} of {expected} events reached a delta")
    finally:
        await follower.aclose()
    worker_cpu, broker_cpu = (cpu_seconds(pid) - before for pid, before in zip(pids, start_cpu, strict=True))
    return arrivals, (worker_cpu, broker_cpu)


def run(broker: EmbeddedBroker, limit: int | None = None,
        start_worker: Callable[[Deployment], WorkerProcess] | None = None) -> dict[str, Any]:
    """`start_worker` replaces the plain `stream-app worker` (experiments: bench.latency.start_staged_worker)."""
    events = click_search_events(limit)
    # No reviews here: the model would only compete for the CPU while it loads (it loads on the first review).
    deployment = new_deployment(broker, PROFILE_ENCODER_PRELOAD="false")
    try:
        started = time.perf_counter()
        asyncio.run(produce(deployment.settings, events))
        produce_s = time.perf_counter() - started
        worker = deployment.start_worker() if start_worker is None else start_worker(deployment)
        # The clock starts when the worker is ready (joined, tables recovered), which is when it starts taking
        # the backlog: not at the first delta, which comes only after the ingest agent's head start (up to
        # half of the work, when the fetch loop outruns the profile agent; docs/benchmarks.md).
        wait_ready(deployment, timeout_s=120, poll_s=0.02)
        first = time.perf_counter()
        arrivals, cpu = asyncio.run(_tail_with_cpu(deployment.settings, len(events), (worker.pid, broker.pid),
                                                     worker))
        worker_cpu, broker_cpu = cpu
        last = arrivals[-1][0]
        deployment.stop()
        # The same records, still in the same input topics, read again by the loop under its own group id.
        loop_cpu = cpu_seconds(os.getpid())
        loop = reference_loop.run(deployment.settings, len(events))
        loop["cpu_s"] = round(cpu_seconds(os.getpid()) - loop_cpu, 2)
        worker_rate = len(events) / (last - first) if last > first else float("nan")
        return {
            "events": len(events),
            "users": len({e["user_id"] for e in events}),
            "deltas": len(arrivals),
            "producer_events_per_s": len(events) / produce_s,
            "worker_events_per_s": worker_rate,
            "seconds": last - first,
            "first_delta_after_s": round(arrivals[0][0] - first, 2),
            "worker_cpu_s": round(worker_cpu, 2),  # ready to last delta
            "broker_cpu_s": round(broker_cpu, 2),
            "worker_cpu_us_per_event": round(1e6 * worker_cpu / len(events), 1),
            "reference_loop": loop,
            "ratio_worker_to_loop": round(worker_rate / loop["events_per_s"], 3),
        }
    finally:
        deployment.stop()


if __name__ == "__main__":
    import sys

    with EmbeddedBroker() as running:
        print(run(running, int(sys.argv[1]) if len(sys.argv) > 1 else None))
