"""`stream-app worker`: create missing topics, register the agents, run a Faust worker until stopped."""

from __future__ import annotations

import asyncio
import gc
import os

from stream_app.encoding import prefer_passive_omp_threads
from stream_app.kafka import tansu_workarounds
from stream_app.kafka.clients import ensure_topics
from stream_app.ops.logging_setup import configure_logging, logging_config, quiet_third_party_output, start_json_stdio
from stream_app.ops.settings import get_settings


def run_worker() -> None:
    prefer_passive_omp_threads(os.environ)  # before anything imports torch
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
    # made since. Worker CPU per click/search event: ~150 -> ~100 us (docs/benchmarks.md). Nothing frozen here
    # is garbage later, so nothing is kept that would have been collected.
    gc.freeze()
    worker.execute_from_commandline()
