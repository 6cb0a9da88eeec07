"""`stream-app subscribe`: the consumer loop that keeps Redis equal to the delta topic, and `redis-get`.

Kafka offsets are committed only after the Redis writes of a batch (see `redis_sink`): a kill -9 loses
nothing, the deltas after the last commit come again and are skipped or applied by version. While Redis is
down or stalled the batch is retried with a bounded exponential backoff and nothing is committed; a record
that is not a delta is counted, logged by its position (never its payload) and skipped.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from stream_app.core.replica import ProfileReplicas
from stream_app.kafka.clients import consumer
from stream_app.kafka.reading import end_offsets
from stream_app.ops.settings import Settings
from stream_app.serving.deltas import MalformedDelta, parse_delta
from stream_app.serving.redis_sink import (
    Backoff,
    DeltaSink,
    Item,
    SinkStats,
    read_partition_history,
    write_with_retry,
)
from stream_app.serving.redis_store import ProfileStore, redis_client

log = logging.getLogger(__name__)


def group_id_for(settings: Settings) -> str:
    return f"{settings.app_id}-redis-sink"


@dataclass
class SubscribeOptions:
    topic: str
    group_id: str
    until_caught_up: bool = False
    max_records: int = 2000
    progress_every_s: float = 5.0
    caught_up_timeout_s: float = 600.0
    backoff: Backoff = field(default_factory=Backoff)


def decode_batch(records: Iterable[Any], stats: SinkStats) -> list[Item]:
    """The applicable deltas of a fetched batch; malformed records are counted, logged and left out."""
    items = []
    for record in records:
        if record.value is None:
            continue
        try:
            items.append(Item(record.topic, record.partition, record.offset, parse_delta(record.value)))
        except MalformedDelta as error:
            stats.malformed += 1
            stats.deltas += 1
            log.warning("redis-sink: %s[%d]@%d is not a delta (%s): skipped", record.topic, record.partition,
                        record.offset, error)
    return items


async def subscribe(settings: Settings, store: ProfileStore, options: SubscribeOptions,
                    stop: asyncio.Event | None = None, report: Callable[[str], None] = print,
                    stats: SinkStats | None = None) -> SinkStats:
    """Consume the delta topic into `store` until `stop` is set (or, with until_caught_up, until the group
    has committed everything the topic held when this started)."""
    from aiokafka.errors import CommitFailedError, IllegalStateError
    from aiokafka.structs import OffsetAndMetadata, TopicPartition


    stop = stop or asyncio.Event()
    history_settings = settings.model_copy(update={"topic_deltas": options.topic})

    async def history(topic: str, partition: int, upto: dict[str, int]) -> ProfileReplicas:
        return await read_partition_history(history_settings, topic, partition, upto)

    sink = DeltaSink(store, history, stats or SinkStats())
    targets: dict[TopicPartition, int] = {}
    if options.until_caught_up:
        targets = {tp: end for tp, end in (await end_offsets(settings, [options.topic])).items() if end > 0}
    client = consumer(settings, group_id=options.group_id, auto_offset_reset="earliest",
                      max_poll_records=options.max_records, **_group_timeouts(settings))
    await client.start()
    committed: dict[TopicPartition, int] = {}
    try:
        client.subscribe([options.topic])
        report(f"subscribe: {options.topic} -> Redis, consumer group {options.group_id}")
        committed = await _committed(client, targets)
        started = last_report = time.monotonic()
        while not stop.is_set():
            if options.until_caught_up and all(committed.get(tp, 0) >= end for tp, end in targets.items()):
                break
            batch = await client.getmany(timeout_ms=500, max_records=options.max_records)
            items = decode_batch((r for records in batch.values() for r in records), sink.stats)
            if not await write_with_retry(sink, items, options.backoff, stop):  # Redis first ...
                break  # stopped while Redis was failing: these offsets stay uncommitted
            offsets = {tp: records[-1].offset + 1 for tp, records in batch.items() if records}
            if offsets:
                try:  # ... then Kafka: a crash in between means redelivery, which the versions absorb.
                    await client.commit({tp: OffsetAndMetadata(o, "") for tp, o in offsets.items()})
                    committed.update(offsets)
                except (CommitFailedError, IllegalStateError) as error:
                    report(f"subscribe: commit failed ({error}); a rebalance moves these deltas, which is harmless")
            elif options.until_caught_up:
                # Idle: partitions of other group members count when the group has committed them.
                committed.update(await _committed(client, targets))
            now = time.monotonic()
            if now - last_report >= options.progress_every_s:
                last_report = now
                committed.update(await _committed(client, set(client.assignment()) - set(committed)))
                report(f"subscribe: {sink.stats.line()}, lag {_lag(client, committed)}")
            if options.until_caught_up and now - started > options.caught_up_timeout_s:
                raise TimeoutError(f"not caught up after {options.caught_up_timeout_s} s: {sink.stats.line()}")
    finally:
        await client.stop()
    report(f"subscribe: {'caught up' if options.until_caught_up else 'stopped'}; {sink.stats.line()}")
    return sink.stats


def _group_timeouts(settings: Settings) -> dict[str, Any]:
    if not settings.embedded_broker:
        return {}
    from stream_app.kafka.tansu_workarounds import HEARTBEAT_INTERVAL_S, SESSION_TIMEOUT_S

    # tansu_workarounds item 1: joins and a killed subscriber's eviction take ~session timeout on Tansu.
    return {"session_timeout_ms": int(SESSION_TIMEOUT_S * 1000),
            "heartbeat_interval_ms": int(HEARTBEAT_INTERVAL_S * 1000)}


async def _committed(client: Any, tps: Iterable[Any]) -> dict[Any, int]:
    return {tp: offset for tp in tps if (offset := await client.committed(tp)) is not None}


def _lag(client: Any, committed: dict[Any, int]) -> int | str:
    """Deltas not yet in Redis on our partitions ('?' until every partition has been fetched once)."""
    highs = {tp: client.highwater(tp) for tp in client.assignment()}
    if any(high is None for high in highs.values()):
        return "?"
    return sum(max(0, high - committed.get(tp, 0)) for tp, high in highs.items())


async def wait_for_redis(client: Any, backoff: Backoff, stop: asyncio.Event, stats: SinkStats) -> bool:
    """PING until Redis answers (True) or `stop` is set (False): a subscriber may start before Redis does.
    A refused password or ACL is not retried (redis-py raises it as a ConnectionError subclass)."""
    import redis.exceptions

    attempt = 0
    while not stop.is_set():
        try:
            await client.ping()
            return True
        except (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError):
            raise
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as error:
            stats.reconnects += 1
            delay = backoff.delay(attempt)
            attempt += 1
            log.warning("redis-sink: Redis not reachable (%s: %s); next try in %.1f s", type(error).__name__, error,
                        delay)
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                pass
    return False


def run_subscriber(settings: Settings, options: SubscribeOptions, redis_url: str | None = None) -> SinkStats:
    """Blocking entry point for the CLI: stops on SIGTERM/SIGINT after finishing the current batch."""
    from stream_app.ops.logging_setup import configure_logging

    configure_logging(settings)
    stats = SinkStats()
    if settings.sink_metrics_port is not None:
        from stream_app.serving.sink_metrics import serve_sink_metrics

        serve_sink_metrics(stats, settings.sink_metrics_port, settings.sink_metrics_host)
        print(f"subscribe: metrics on http://{settings.sink_metrics_host}:{settings.sink_metrics_port}/metrics",
              flush=True)

    async def main() -> SinkStats:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        client = redis_client(settings, redis_url)
        try:
            if not await wait_for_redis(client, options.backoff, stop, stats):
                return stats
            return await subscribe(settings, ProfileStore(client, options.topic), options, stop,
                                   report=lambda line: print(line, flush=True), stats=stats)
        finally:
            await client.aclose()

    return asyncio.run(main())


async def read_views(settings: Settings, user_ids: Sequence[str] | None, at: float | None,
                     redis_url: str | None = None, topic: str | None = None) -> list[dict[str, Any]]:
    """Profiles from Redis as the subscriber of `topic` (default PROFILE_TOPIC_DELTAS) wrote them."""
    client = redis_client(settings, redis_url)
    try:
        return await ProfileStore(client, topic or settings.topic_deltas).views(user_ids, at)
    finally:
        await client.aclose()
