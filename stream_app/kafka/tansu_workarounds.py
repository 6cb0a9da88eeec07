"""Every work-around for the embedded Tansu broker, and nothing else.

Active when `PROFILE_EMBEDDED_BROKER=true` (set by the code that starts the embedded broker), or when
`stream-app worker` finds at start that the broker is Tansu (`detect`: its Metadata answer carries the cluster
id `tansu_cluster`; Apache Kafka's is a base64 UUID), so a worker started by hand next to `stream-app broker`
cannot run without them. Against a real Kafka cluster none of this is imported into the running path.
Each item names the Tansu behaviour it answers and has a test in tests/integration/test_tansu_workarounds.py that fails
without it.

1. JoinGroup is held for about session_timeout / 2, and a first-generation member that stops is only
   evicted by session timeout (aiokafka sends no LeaveGroup for generation 0): a short session timeout
   keeps joins and restarts at a few seconds instead of 30-60 s.
2. ListOffsets(latest) answers "base offset of the last stored batch + 1", not the end offset; Faust's
   table recovery reads the changelog up to that offset and would lose the last batch's updates. We
   correct it with the high watermark of a fetch response, which Tansu reports correctly.
3. InitProducerId is only answered at v3 (aiokafka sends v0), so idempotent/transactional producers
   fail: `exactly_once` is refused up front with a clear message.
4. Faust hard-codes fetch_max_wait_ms=1500; on Tansu a fetch that finds nothing new waits that long even
   when records arrive meanwhile (no early return), so every hop costs up to the whole wait: 1500 ms gave
   ~1 s event-to-delta latency. 100 ms: up to 100 ms per hop, and the hop is one for events that arrive on
   their user's partition (folded where they land), two for the others. Shorter waits poll more, and on a
   small machine the polling takes CPU from the review encoder: an idle worker and the broker used 5.7 % +
   10.3 % of a core at 25 ms, 3.3 % + 4.5 % at 100 ms; produce -> delta p99 at 500/s rose from 43-47 to
   77-80 ms (one hop) and from 76-96 to 134-136 ms (two hops). See docs/benchmarks.md.
5. ListOffsets by timestamp (offsets-for-times) answers offset 0 whatever the timestamp, so a replay
   `--since T` would start at the beginning. We find the first record with timestamp >= T by reading the
   partition (the embedded broker holds demo- and test-sized data in memory; real Kafka has an index).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

from stream_app.ops.settings import Settings

SESSION_TIMEOUT_S: Final = 6.0
HEARTBEAT_INTERVAL_S: Final = 1.0
FETCH_MAX_WAIT_MS: Final = 100

TANSU_CLUSTER_ID_PREFIX: Final = "tansu"

_installed = False
logger = logging.getLogger(__name__)


class EmbeddedBrokerUnsupported(ValueError):
    pass


async def cluster_id(settings: Settings) -> str | None:
    """The cluster id the broker reports in its Metadata answer (None if it reports none)."""
    import aiokafka
    from aiokafka.protocol.metadata import MetadataRequest

    from stream_app.kafka.clients import client_kwargs

    client = aiokafka.AIOKafkaClient(**client_kwargs(settings))
    await client.bootstrap()
    try:
        node_id = next(iter(client.cluster.brokers())).nodeId
        response = await client.send(node_id, MetadataRequest([]))
        found = getattr(response, "cluster_id", None)
        return None if found is None else str(found)
    finally:
        await client.close()


def is_tansu(found_cluster_id: str | None) -> bool:
    return found_cluster_id is not None and found_cluster_id.lower().startswith(TANSU_CLUSTER_ID_PREFIX)


async def detect(settings: Settings) -> Settings:
    """`settings` with `embedded_broker` on if the broker says it is Tansu (an explicit true stays true)."""
    if settings.embedded_broker or not settings.embedded_broker_detect:
        return settings
    found = await cluster_id(settings)
    if not is_tansu(found):
        return settings
    logger.warning("the broker reports cluster id %r: it is the embedded Tansu broker, so the worker turns on "
                   "its work-arounds (PROFILE_EMBEDDED_BROKER=true)", found)
    return settings.model_copy(update={"embedded_broker": True})


def app_overrides(settings: Settings) -> dict[str, Any]:
    """Faust settings for the embedded broker (item 1 and 3)."""
    if settings.processing_guarantee == "exactly_once":
        raise EmbeddedBrokerUnsupported(
            "exactly_once needs idempotent/transactional producers, and the embedded Tansu broker only "
            "answers InitProducerId at v3 (aiokafka sends v0); use at_least_once (the default) with it"
        )
    return {
        "broker_session_timeout": SESSION_TIMEOUT_S,
        "broker_heartbeat_interval": HEARTBEAT_INTERVAL_S,
        "broker_rebalance_timeout": SESSION_TIMEOUT_S * 2,
        "producer_enable_idempotence": False,
    }


def install(settings: Settings) -> None:
    """Patch Faust's aiokafka driver for the embedded broker (items 2 and 4). Idempotent."""
    global _installed
    if _installed:
        return
    from faust.transport.drivers import aiokafka as driver

    original_create = driver.AIOKafkaConsumerThread._create_worker_consumer

    def create_worker_consumer(self: Any, transport: Any) -> Any:
        consumer = original_create(self, transport)
        # aiokafka reads this attribute when the consumer starts its fetcher.
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer

    original_highwaters = driver.AIOKafkaConsumerThread._highwaters

    async def highwaters(self: Any, partitions: Any) -> Mapping[Any, int]:
        listed = await original_highwaters(self, partitions)
        if self.consumer.in_transaction:
            return listed
        consumer = self._ensure_consumer()
        return await true_end_offsets(consumer._client._bootstrap_servers, listed)

    driver.AIOKafkaConsumerThread._create_worker_consumer = create_worker_consumer  # type: ignore[method-assign]
    driver.AIOKafkaConsumerThread._highwaters = highwaters  # type: ignore[method-assign]
    _installed = True


async def true_end_offsets(bootstrap: Any, listed: Mapping[Any, int], timeout_s: float = 10.0) -> dict[Any, int]:
    """End offsets from fetch high watermarks, starting from what ListOffsets claimed.

    Tansu's ListOffsets(latest) is at most one batch short, so fetching from one before it returns that
    last batch, and the fetch response's high watermark is the true end offset.
    """
    import aiokafka
    from aiokafka.structs import TopicPartition

    result = {tp: offset for tp, offset in listed.items()}
    probe_tps = [tp for tp, offset in listed.items() if offset > 0]
    if not probe_tps:
        return result
    probe = aiokafka.AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None, fetch_max_wait_ms=50,
        max_partition_fetch_bytes=1024,
    )
    await probe.start()
    try:
        aio_tps = {tp: TopicPartition(tp.topic, tp.partition) for tp in probe_tps}
        probe.assign(list(aio_tps.values()))
        for tp, aio_tp in aio_tps.items():
            probe.seek(aio_tp, listed[tp] - 1)
        deadline = time.monotonic() + timeout_s
        pending = dict(aio_tps)
        while pending and time.monotonic() < deadline:
            await probe.getmany(*pending.values(), timeout_ms=200, max_records=1)
            for tp, aio_tp in list(pending.items()):
                high = probe.highwater(aio_tp)
                if high is not None:
                    result[tp] = max(listed[tp], high)
                    del pending[tp]
            await asyncio.sleep(0)
        if pending:
            raise TimeoutError(f"no fetch high watermark for {sorted(map(str, pending))} in {timeout_s} s")
    finally:
        await probe.stop()
    return result


async def offsets_for_times_by_scan(
    bootstrap: Any, partitions: Sequence[Any], timestamp_ms: int, timeout_s: float = 120.0
) -> dict[Any, int | None]:
    """Per partition, the offset of the first record with timestamp >= timestamp_ms (None: no such record)."""
    import aiokafka

    found: dict[Any, int | None] = {tp: None for tp in partitions}
    if not partitions:
        return found
    scanner = aiokafka.AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None, fetch_max_wait_ms=50,
    )
    await scanner.start()
    try:
        ends = await true_end_offsets(bootstrap, await scanner.end_offsets(list(partitions)))
        pending = [tp for tp in partitions if ends[tp] > 0]
        if not pending:
            return found
        scanner.assign(pending)
        await scanner.seek_to_beginning(*pending)
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"scanning {sorted(map(str, pending))} for timestamps took over {timeout_s} s")
            batch = await scanner.getmany(*pending, timeout_ms=200, max_records=10_000)
            for tp, records in batch.items():
                hit = next((r.offset for r in records if r.timestamp >= timestamp_ms), None)
                if hit is not None:
                    found[tp] = hit
                    pending.remove(tp)
                elif records and records[-1].offset + 1 >= ends[tp]:
                    pending.remove(tp)
    finally:
        await scanner.stop()
    return found
