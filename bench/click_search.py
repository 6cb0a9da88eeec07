"""Click/search path: events/s of one worker on a pre-loaded backlog of real-derived events, and of the
hand-written reference loop (bench/reference_loop.py) on the very same records, right after, on the same broker."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from bench import reference_loop
from bench.harness import cpu_seconds, new_deployment, produce, tail_deltas
from stream_app.kafka.embedded_broker import EmbeddedBroker
from stream_app.tools.sample_data import sample_events


def click_search_events(limit: int | None = None) -> list[dict[str, Any]]:
    """All CDNOW purchases as clicks plus Women's review titles as searches (see docs/sample-data.md)."""
    events = [e for e in sample_events(customers=30_000, reviews_per_customer=1) if e["type"] != "review"]
    return events[:limit] if limit is not None else events


def run(broker: EmbeddedBroker, limit: int | None = None) -> dict[str, Any]:
    events = click_search_events(limit)
    # No reviews here: the model would only compete for the CPU while it loads (it loads on the first review).
    deployment = new_deployment(broker, PROFILE_ENCODER_PRELOAD="false")
    try:
        started = time.perf_counter()
        asyncio.run(produce(deployment.settings, events))
        produce_s = time.perf_counter() - started
        worker = deployment.start_worker()
        broker_pid = broker.pid
        broker_cpu, worker_cpu = cpu_seconds(broker_pid), cpu_seconds(worker.pid)
        arrivals = asyncio.run(tail_deltas(deployment.settings, len(events), timeout_s=600))
        broker_cpu, worker_cpu = cpu_seconds(broker_pid) - broker_cpu, cpu_seconds(worker.pid) - worker_cpu
        first, last = arrivals[0][0], arrivals[-1][0]
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
            "worker_cpu_s": worker_cpu,
            "broker_cpu_s": broker_cpu,
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
