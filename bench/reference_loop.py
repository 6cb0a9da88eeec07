"""The hand-written reference: one confluent-kafka loop doing the worker's job without Faust.

Per poll of up to `batch_max` messages: parse and validate each message with the worker's own triage
(`stream_app.core.triage`), fold each user's events with the worker's own profile logic
(`stream_app.core.fold.update_profile`, i.e. `stream_app.core.profile.apply`: the same decay, dedup and outbox),
write each touched user's state to a state topic and one delta per user per batch to a delta topic, wait
until the broker acknowledged both (librdkafka flush), then commit the input offsets. The state lives in a
dict in this process.

So the worker and this loop do the same per-event work in our code; what separates them is the framework
(Faust's streams, two hops through the by-user topic, the table, per-message acks and sensors). The loop has
no by-user hop, no rebalancing, no table recovery and no HTTP lookup: it is the floor, not a design.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from stream_app.core.fold import group_by_user, update_profile
from stream_app.core.profile import ProfileParams
from stream_app.core.triage import Rejection, triage
from stream_app.ops.settings import Settings


async def _create_topics(settings: Settings, names: list[str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from stream_app.kafka.clients import client_kwargs

    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=settings.partitions,
                                            replication_factor=settings.replication_factor) for name in names])
    finally:
        await admin.close()


def run(settings: Settings, expected_events: int, timeout_s: float = 600) -> dict[str, Any]:
    """Consume `expected_events` waiting in the click and search topics; events/s from first poll to last commit."""
    from confluent_kafka import Consumer, Producer

    state_topic, delta_topic = f"{settings.app_id}-loop-state", f"{settings.app_id}-loop-deltas"
    asyncio.run(_create_topics(settings, [state_topic, delta_topic]))
    bootstrap = settings.bootstrap_servers[0]
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"{settings.app_id}-loop", "auto.offset.reset": "earliest",
        "enable.auto.commit": False, "session.timeout.ms": 6000, "fetch.wait.max.ms": 100,
    })
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": False, "acks": "all",
                         "batch.size": 1024 * 1024, "queue.buffering.max.messages": 1_000_000})
    params = ProfileParams.from_settings(settings)
    states: dict[str, dict[str, Any]] = {}
    consumed = rejected = deltas = batches = 0
    first: float | None = None
    deadline = time.monotonic() + timeout_s
    consumer.subscribe([settings.topic_clicks, settings.topic_searches])
    try:
        while consumed < expected_events:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reference loop consumed only {consumed} of {expected_events} events")
            messages = consumer.consume(num_messages=settings.batch_max, timeout=0.1)
            messages = [m for m in messages if m.error() is None]
            if not messages:
                continue
            if first is None:
                first = time.perf_counter()
            events = []
            now = time.time()  # the ingest clock of the future-timestamp rule, once per poll like the worker
            for message in messages:
                verdict = triage(settings, message.topic() or "", message.key(), message.value(), now)
                if isinstance(verdict, Rejection):
                    rejected += 1
                else:
                    events.append(verdict)
            for user_id, user_events in group_by_user(events).items():
                new_value, result = update_profile(states.get(user_id), user_id, user_events, params)
                if new_value is None or result.delta is None:
                    continue
                states[user_id] = new_value
                key = user_id.encode()
                producer.produce(state_topic, orjson.dumps(new_value), key)
                producer.produce(delta_topic, orjson.dumps(result.delta), key)
                deltas += 1
                producer.poll(0)
            # The worker's guarantee: state and deltas stored before the input offsets are committed.
            if producer.flush(30) != 0:
                raise RuntimeError("reference loop: the broker did not acknowledge every write within 30 s")
            consumer.commit(asynchronous=False)
            consumed += len(messages)
            batches += 1
        seconds = time.perf_counter() - (first or time.perf_counter())
    finally:
        consumer.close()
    return {
        "events": consumed, "rejected": rejected, "users": len(states), "deltas": deltas, "polls": batches,
        "seconds": round(seconds, 2), "events_per_s": round(consumed / seconds, 1) if seconds > 0 else float("nan"),
        "profile_logic": "stream_app.core.profile.apply via core.fold.update_profile (the worker's own)",
    }

