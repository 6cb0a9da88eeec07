"""Builds the worker from `Settings`: the `faust.App`, its topics, table, outputs, pages and agents.

Nothing happens at import: `build_worker` is called by the worker entry point (and by tests, with their own
settings and encoder), so importing any module of the engine never creates an app or patches Faust.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faust
from faust.types import AgentT

from stream_app.core.profile import ProfileParams
from stream_app.encoding.encoder import TextEncoder
from stream_app.encoding.service import EncoderService
from stream_app.kafka import codecs, tansu_workarounds
from stream_app.kafka.clients import sasl_login, ssl_context
from stream_app.kafka.partitioning import KeyPartitioner
from stream_app.ops.settings import Settings
from stream_app.worker import buffers, commit_safety, fast_delivery, health, web
from stream_app.worker.admission import load_replay_refusals
from stream_app.worker.folding import Folder
from stream_app.worker.publish import Output
from stream_app.worker.tables import ProfileTable, profile_table
from stream_app.worker.topics import Topics, declare_topics


def faust_config(settings: Settings) -> dict[str, Any]:
    """Every value Faust gets, spelled out, so that nothing depends on Faust's own defaults by accident."""
    config: dict[str, Any] = {
        "broker": settings.broker_url,
        "store": "memory://",
        "datadir": settings.data_dir,
        "processing_guarantee": settings.processing_guarantee,
        "topic_partitions": settings.partitions,
        "topic_replication_factor": settings.replication_factor,
        "topic_allow_declare": True,
        "key_serializer": "utf8",
        "value_serializer": "raw",
        "table_cleanup_interval": 30.0,
        "web_enabled": settings.web_enabled,
        "web_port": settings.web_port,
        "web_host": settings.web_host,
        "web_bind": settings.web_host,  # Faust binds 0.0.0.0 unless told: only where we were asked to listen
        "canonical_url": settings.web_canonical_url or f"http://{settings.web_host}:{settings.web_port}",
        "autodiscover": False,
        "consumer_auto_offset_reset": "earliest",
        "producer_acks": -1,
        # No linger: every hop and the table-write confirmation waited for it (linger 10 vs 1 ms: produce->delta
        # p50 316 vs 96 ms at 500 events/s, on a loaded machine; docs/benchmarks.md). Batches still form: aiokafka
        # keeps one request in flight per broker, and what arrives meanwhile goes out together in the next one.
        "producer_linger_ms": 0,
        # No batch and no record over the record limit (stock Kafka: message.max.bytes = 1,048,588): aiokafka
        # refuses a record over max_request_size when it is sent, so a record we failed to bound fails its
        # batch here instead of being rejected by a real broker after the embedded one accepted it in tests.
        "producer_max_batch_size": min(1024 * 1024, settings.max_record_bytes),
        "producer_max_request_size": settings.max_record_bytes,
        "producer_partitioner": KeyPartitioner(),  # aiokafka's default, with the key hashes remembered
        "broker_max_poll_records": 5000,
        "stream_buffer_maxsize": 4 * settings.batch_max,
        "consumer_max_fetch_size": max(4 * 1024 * 1024, 2 * settings.max_record_bytes),
        "broker_credentials": _credentials(settings),
        # Faust's own views off; the bearer-token check when PROFILE_WEB_TOKEN is set (worker/web.py).
        **web.faust_web_config(settings.web_token.get_secret_value() if settings.web_token is not None else None),
    }
    if settings.embedded_broker:
        config.update(tansu_workarounds.app_overrides(settings))
    return config


def _credentials(settings: Settings) -> Any:
    login = sasl_login(settings)
    if login is not None:
        return faust.SASLCredentials(username=login.username, password=login.password, mechanism=login.mechanism,
                                     ssl_context=ssl_context(settings))
    context = ssl_context(settings)
    return None if context is None else faust.SSLCredentials(context)


def build_app(settings: Settings) -> faust.App:
    codecs.register()
    commit_safety.install()
    fast_delivery.install()
    if settings.embedded_broker:
        tansu_workarounds.install(settings)
    app = faust.App(settings.app_id, **faust_config(settings))
    buffers.install(app, settings.buffer_max_bytes)
    if not settings.faust_message_sensors:
        from stream_app.ops.metrics import quiet_message_sensors

        quiet_message_sensors(app)
    return app


@dataclass
class WorkerApp:
    """Everything an agent works with, passed in instead of imported: the one place agents get it from."""

    settings: Settings
    app: faust.App
    topics: Topics
    profiles: ProfileTable
    output: Output
    params: ProfileParams
    encoder: EncoderService
    folder: Folder
    readiness: dict[str, Callable[[], bool]] = field(default_factory=dict)
    agents: dict[str, AgentT] = field(default_factory=dict)
    # Replays only: the input records the live run refused as future_timestamp (worker/admission.py).
    refused_live: frozenset[tuple[str, int, int]] = frozenset()


def build_worker(settings: Settings, *, encoder: TextEncoder | None = None) -> WorkerApp:
    """The whole worker for these settings; `encoder` replaces the real model (tests)."""
    from agents import ROSTER

    app = build_app(settings)
    topics = declare_topics(app, settings)
    profiles = profile_table(app, settings)
    output = Output(app, settings, topics)
    params = ProfileParams.from_settings(settings)
    folder = Folder(settings, app, topics.events_by_user.get_topic_name(), profiles, output, params)
    worker = WorkerApp(settings, app, topics, profiles, output, params, EncoderService(settings, encoder), folder,
                       refused_live=load_replay_refusals(settings.replay_refusals))
    for register in ROSTER:
        agent = register(worker)
        worker.agents[agent.name] = agent
    health.register(app, worker.readiness)
    web.register(app, profiles, output.outgoing_user_id)
    return worker
