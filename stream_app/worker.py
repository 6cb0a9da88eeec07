"""`stream-app worker`: create missing topics, register the agents, run a Faust worker until stopped."""

from __future__ import annotations

import asyncio

from stream_app.kafka_clients import ensure_topics
from stream_app.settings import get_settings


def run_worker() -> None:
    settings = get_settings()
    asyncio.run(ensure_topics(settings))

    from faust.worker import Worker

    # Importing registers the agents and pages on the app.
    import agents.ingest  # noqa: F401
    import agents.profiles  # noqa: F401
    import agents.reviews  # noqa: F401
    import stream_app.health  # noqa: F401
    import stream_app.web  # noqa: F401
    from stream_app import metrics
    from stream_app.app import app

    metrics.install(app)

    worker = Worker(app, loglevel=settings.log_level, quiet=True)
    # Faust's terminal spinner sets the root logger to DEBUG so that it can spin on every record: at
    # thousands of events/s that is a LogRecord per Kafka send (measured: ~9% of worker CPU).
    worker.spinner = None
    worker.execute_from_commandline()
