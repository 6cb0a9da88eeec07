"""Prometheus metrics: Faust's own sensor (`faust_*`) plus the engine's (`profile_*`), on GET /metrics."""

from __future__ import annotations

from faust import App
from prometheus_client import Counter, Histogram

EVENTS = Counter("profile_events_total", "Valid input events by type", ["type"])
DEAD_LETTERS = Counter("profile_dead_letters_total", "Messages sent to the dead-letter topic, by kind of reason",
                       ["kind"])
DELTAS = Counter("profile_deltas_total", "Deltas published (first sends and re-emissions)", ["kind"])
DUPLICATES = Counter("profile_duplicate_events_total", "Redelivered events that were not counted again")
BATCH_EVENTS = Histogram("profile_batch_events", "Events per micro-batch", ["agent"],
                         buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000))
REVIEW_BATCH_TOKENS = Histogram("profile_encoder_batch_padded_tokens", "Padded tokens per encoder forward pass",
                                buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768))
ENCODER_SECONDS = Histogram("profile_encoder_seconds", "Encoder time per review micro-batch (tokenise + forward)",
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
DELTA_LAG = Histogram("profile_delta_lag_seconds",
                      "Wall clock at delta publish minus the profile's newest event time (live: end-to-end freshness)",
                      buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600))

def install(app: App) -> None:
    from faust.sensors.prometheus import setup_prometheus_sensors

    setup_prometheus_sensors(app, name_prefix="faust")
