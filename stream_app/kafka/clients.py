"""Plain aiokafka clients (admin, producer, consumer) configured from Settings, for our CLI tools."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any

import aiokafka
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from stream_app.ops.settings import Settings


@dataclass(frozen=True)
class SaslLogin:
    mechanism: str
    username: str
    password: str = field(repr=False)


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for SSL and SASL_SSL (None for plaintext): the same for Faust and our own clients."""
    if not settings.security_protocol.endswith("SSL"):
        return None
    return ssl.create_default_context(cafile=settings.ssl_cafile)


def sasl_login(settings: Settings) -> SaslLogin | None:
    if not settings.security_protocol.startswith("SASL"):
        return None
    # Both present: guaranteed by Settings validation.
    assert settings.sasl_username is not None and settings.sasl_password is not None  # noqa: S101
    return SaslLogin(settings.sasl_mechanism, settings.sasl_username, settings.sasl_password.get_secret_value())


def client_kwargs(settings: Settings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "security_protocol": settings.security_protocol,
    }
    context = ssl_context(settings)
    if context is not None:
        kwargs["ssl_context"] = context
    login = sasl_login(settings)
    if login is not None:
        kwargs.update(sasl_mechanism=login.mechanism, sasl_plain_username=login.username,
                      sasl_plain_password=login.password)
    return kwargs


def producer(settings: Settings, **overrides: Any) -> aiokafka.AIOKafkaProducer:
    options: dict[str, Any] = {"acks": "all", "linger_ms": 5, "max_batch_size": 256 * 1024}
    options.update(overrides)
    return aiokafka.AIOKafkaProducer(**client_kwargs(settings), **options)


def consumer(settings: Settings, **overrides: Any) -> aiokafka.AIOKafkaConsumer:
    options: dict[str, Any] = {"enable_auto_commit": False, "group_id": None, "fetch_max_wait_ms": 100}
    options.update(overrides)
    return aiokafka.AIOKafkaConsumer(**client_kwargs(settings), **options)


async def ensure_topics(settings: Settings) -> None:
    """Create the topics the engine reads and writes, if they do not exist yet."""
    wanted = [
        NewTopic(name, num_partitions=partitions, replication_factor=settings.replication_factor)
        for name, partitions in (
            *((topic, settings.input_partitions) for topic in settings.input_topics.values()),
            (settings.topic_dead_letters, 1),
            (settings.topic_deltas, settings.partitions),
        )
    ]
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t.name not in existing]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # another process won the race
    finally:
        await admin.close()
