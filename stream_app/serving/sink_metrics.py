"""Prometheus metrics of `stream-app subscribe`, on a port of its own (PROFILE_SINK_METRICS_PORT).

The counters are the sink's `SinkStats`, read at scrape time by a collector: one source of truth for the
progress line and the metrics, and nothing to keep in step. Exposed as `profile_sink_<name>_total`.
Only counts are served (no ids, no profile values), so the endpoint has no token; it binds
PROFILE_SINK_METRICS_HOST (loopback by default).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from stream_app.serving.redis_sink import SinkStats

HELP: Final = {
    "deltas": "Delta records handled (applied, skipped, or skipped for a reason)",
    "applied": "Deltas applied to Redis",
    "skipped": "Deltas not newer than Redis' version (redeliveries)",
    "resynced": "Users rebuilt from the delta topic after a version gap",
    "unrepaired": "Resyncs whose history lacks the user's early deltas (stored profile kept, or partial)",
    "conflicts": "Compare-and-set writes lost to another writer (retried)",
    "malformed": "Records of the delta topic that are not an applicable delta (skipped)",
    "foreign": "Deltas skipped because the user's key holds something else (WRONGTYPE)",
    "reconnects": "Batches retried after a Redis connection error or timeout",
}


class SinkCollector(Collector):
    def __init__(self, stats: SinkStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, value in self.stats.as_dict().items():
            yield CounterMetricFamily(f"profile_sink_{name}", HELP[name], value=value)


def sink_registry(stats: SinkStats) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(SinkCollector(stats))
    return registry


def serve_sink_metrics(stats: SinkStats, port: int, host: str) -> Any:
    """Start the metrics server in a thread (prometheus_client's own); returns (server, thread)."""
    return start_http_server(port, addr=host, registry=sink_registry(stats))
