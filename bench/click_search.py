"""Click/search path: end-to-end events/s of one worker on a pre-loaded backlog of real-derived events."""

from __future__ import annotations

import asyncio
import time
from typing import Any

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
        return {
            "events": len(events),
            "users": len({e["user_id"] for e in events}),
            "deltas": len(arrivals),
            "producer_events_per_s": len(events) / produce_s,
            "worker_events_per_s": len(events) / (last - first) if last > first else float("nan"),
            "seconds": last - first,
            "worker_cpu_s": worker_cpu,
            "broker_cpu_s": broker_cpu,
        }
    finally:
        deployment.stop()


if __name__ == "__main__":
    import sys

    with EmbeddedBroker() as running:
        print(run(running, int(sys.argv[1]) if len(sys.argv) > 1 else None))
