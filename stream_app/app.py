"""Builds the `faust.App` from `Settings`; nothing else lives here."""

from __future__ import annotations

from typing import Any

import faust

from stream_app import codecs, tansu_workarounds
from stream_app.settings import Settings, get_settings


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
        # Fewer, larger produce requests: the broker shares the machine, and per-request cost dominates.
        "producer_linger_ms": 10,
        "producer_max_batch_size": 1024 * 1024,
        "producer_max_request_size": 4 * 1024 * 1024,
        "broker_max_poll_records": 5000,
        "stream_buffer_maxsize": 4 * settings.batch_max,
        "consumer_max_fetch_size": 4 * 1024 * 1024,
        "broker_credentials": _credentials(settings),
    }
    if settings.embedded_broker:
        config.update(tansu_workarounds.app_overrides(settings))
    return config


def _credentials(settings: Settings) -> Any:
    if settings.security_protocol == "PLAINTEXT":
        return None
    ssl_context = None
    if settings.security_protocol.endswith("SSL"):
        import ssl

        ssl_context = ssl.create_default_context(cafile=settings.ssl_cafile)
    if settings.security_protocol.startswith("SASL"):
        assert settings.sasl_username is not None and settings.sasl_password is not None  # noqa: S101
        return faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password.get_secret_value(),
            mechanism=settings.sasl_mechanism,
            ssl_context=ssl_context,
        )
    return faust.SSLCredentials(ssl_context)


def build_app(settings: Settings) -> faust.App:
    codecs.register()
    if settings.embedded_broker:
        tansu_workarounds.install(settings)
    return faust.App(settings.app_id, **faust_config(settings))


settings = get_settings()
app = build_app(settings)
