"""`stream-app worker`: create missing topics, register the agents, run a Faust worker until stopped."""

from __future__ import annotations

import asyncio
import gc
import os

from stream_app.encoding import torch_process_defaults
from stream_app.kafka import tansu_workarounds
from stream_app.kafka.clients import ensure_topics
from stream_app.ops.logging_setup import configure_logging, logging_config, quiet_third_party_output, start_json_stdio
from stream_app.ops.settings import get_settings


def run_worker() -> None:
    torch_process_defaults(os.environ)  # before anything imports torch
    # First, before anything can print: with PROFILE_LOG_FORMAT=json every output line must be JSON.
    start_json_stdio(os.environ)
    quiet_third_party_output()
    settings = get_settings()
    # Before anything can log: topic creation already talks to the broker.
    configure_logging(settings)
    from stream_app.encoding.bert_encoder import EncoderConfigurationError, check_configuration

    try:
        check_configuration(settings)
    except EncoderConfigurationError as exc:
        raise SystemExit(f"stream-app worker: {exc}") from exc
    # A worker started by hand next to `stream-app broker` needs the Tansu work-arounds even if nobody said so.
    settings = asyncio.run(tansu_workarounds.detect(settings))
    asyncio.run(ensure_topics(settings))

    use_event_loop(settings.event_loop)
    from faust.worker import Worker

    from stream_app.ops import metrics
    from stream_app.worker.app import build_worker

    app = build_worker(settings).app
    metrics.install(app)

    # Faust replaces the root logger's handlers on start; handing it our config keeps one format and the
    # redacting filter on everything, including print()s it redirects to the log.
    worker = Worker(app, loglevel=settings.log_level, logging_config=logging_config(settings), quiet=True)
    # Faust's terminal spinner sets the root logger to DEBUG so that it can spin on every record: at
    # thousands of events/s that is a LogRecord per Kafka send (measured: ~9% of worker CPU).
    worker.spinner = None
    # Torch, transformers and Faust leave ~220,000 objects that live as long as the worker. Each full
    # collection walked them all (~120 ms each, several per minute on a backlog); frozen, it walks only what was
    # made since. Worker CPU per click/search event: ~150 -> ~100 us (docs/benchmarks.md). What is frozen is the
    # imported code and the built app, alive until exit; a frozen object that became cyclic garbage would stay.
    gc.freeze()
    # The table's profiles outlive the young generations, so full collections (by default one per 10 middle ones,
    # when the long-lived objects grew by a quarter) keep walking a growing table: 18 of them took 1.8 s of a
    # worker's ~9 s on an 89,334-event backlog. One per 100 middle collections: 1 full collection, 0.1 s; worker
    # CPU per event 96 -> 87 and 139 -> 102 us in two A/B pairs (docs/benchmarks.md). Young garbage is collected
    # as often as before; cyclic garbage that reached the oldest generation waits longer.
    gc.set_threshold(700, 10, 100)
    worker.execute_from_commandline()


def use_event_loop(name: str) -> None:
    """Make `name` the event loop of everything that starts one from here on (the Faust worker's included)."""
    if name != "uvloop":
        return
    try:
        import uvloop
    except ImportError as exc:  # a platform without a uvloop wheel (Windows), or an install without it
        raise SystemExit("stream-app worker: PROFILE_EVENT_LOOP=uvloop but uvloop is not installed "
                         "(pip install uvloop, or PROFILE_EVENT_LOOP=asyncio)") from exc
    # Faust's per-message path is mostly event-loop work (callbacks, futures, socket reads): in C it costs less.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
