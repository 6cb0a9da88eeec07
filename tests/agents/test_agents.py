"""Each agent driven through Faust's `agent.test_context()`: no broker, real agent code, a worker built per test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest.mock import AsyncMock, MagicMock, patch

import orjson
import pytest

from schemas.events import Event
from stream_app.core.fold import encode_bundle
from stream_app.encoding.encoder import FakeEncoder
from stream_app.ops.settings import Settings
from stream_app.worker.app import WorkerApp, build_worker


def stored(*_args: Any, **_kwargs: Any) -> asyncio.Future[None]:
    """A send the broker has already acknowledged."""
    done = asyncio.get_running_loop().create_future()
    done.set_result(None)
    return done


def all_stored(*_args: Any, **_kwargs: Any) -> list[asyncio.Future[None]]:
    """What Output.deltas returns when the broker has acknowledged every batch."""
    return [stored()]


class RecordedBatch:
    def __init__(self) -> None:
        self.records: list[tuple[bytes | None, bytes]] = []

    def append(self, *, key: bytes | None, value: bytes, timestamp: None) -> object:
        self.records.append((key, value))
        return self

    def record_count(self) -> int:
        return len(self.records)


class BatchProducer:
    """The aiokafka producer under Faust's, as `send_batched` uses it, without a broker: every record of a batch
    goes to `send(topic, key, value, partition, timestamp, headers)` (the signature of Faust's Producer.send),
    and the batch's future is the records' futures together."""

    def __init__(self, send: Callable[..., Any], partitions: int) -> None:
        self.send = send
        self.client = MagicMock(_wait_on_metadata=AsyncMock())
        self.client.cluster.partitions_for_topic.return_value = set(range(partitions))

    def create_batch(self) -> RecordedBatch:
        return RecordedBatch()

    async def send_batch(self, batch: RecordedBatch, topic: str, *, partition: int) -> asyncio.Future[Any]:
        sent = []
        for key, value in batch.records:
            result = self.send(topic, key, value, partition, None, None)
            sent.append(await result if asyncio.iscoroutine(result) else result)
        return asyncio.ensure_future(asyncio.gather(*sent))


def batch_sends(worker: WorkerApp, send: Callable[..., Any]) -> Any:
    """Patch the worker's batched sends (table writes, deltas) to go record by record to `send`."""
    producer = BatchProducer(send, worker.settings.partitions)
    return patch.object(worker.app.producer, "_ensure_producer", return_value=producer)


def published(deltas: AsyncMock) -> list[dict[str, Any]]:
    """The deltas handed to a patched Output.deltas, in order."""
    return [delta for call in deltas.await_args_list for delta, _ in call.args[0]]


def make_worker(encoder: FakeEncoder | None = None, **settings: Any) -> WorkerApp:
    # The real model has its own tests; these are about the agents' plumbing.
    return build_worker(Settings(**settings), encoder=encoder or FakeEncoder())


@pytest.fixture
def worker() -> Iterator[WorkerApp]:
    built = make_worker()
    yield built
    built.encoder.stop()


@contextmanager
def record_outputs(worker: WorkerApp) -> Iterator[dict[str, Any]]:
    """Patches the worker's outputs and table writes; yields the mocks by name. The profile agent's table writes
    go to the producer (`ProfileTable.write_many`), a write outside an agent through Faust's `send_changelog`."""
    with patch.object(worker.output, "events", new_callable=AsyncMock) as events, \
         patch.object(worker.output, "dead_letter", new_callable=AsyncMock) as dlq, \
         patch.object(worker.output, "deltas", new_callable=AsyncMock, side_effect=all_stored) as deltas, \
         batch_sends(worker, changelog_sends := MagicMock(side_effect=stored)), \
         patch.object(worker.profiles, "send_changelog") as changelog:
        changelog.return_value.message.partition = 0
        yield {"events": events, "dlq": dlq, "deltas": deltas, "changelog": changelog_sends}


@pytest.fixture
def sent(worker: WorkerApp) -> Iterator[dict[str, Any]]:
    with record_outputs(worker) as calls:
        yield calls


def forwarded(sent: dict[str, Any]) -> list[Event]:
    return [event for call in sent["events"].await_args_list for event in call.args[0]]


async def test_ingest_rekeys_valid_events_and_dead_letters_the_rest(worker: WorkerApp, sent: dict[str, Any]) -> None:
    good = {"event_id": "e1", "user_id": "u1", "ts": "2024-01-01T00:00:00Z", "type": "click", "item_id": "i"}
    async with worker.agents["ingest"].test_context() as agent:
        await agent.put(b"{broken", key=b"u9")
        await agent.put(orjson.dumps(good), key=b"whatever-the-producer-used")
        await agent.put(orjson.dumps(good), key=None)
    dead = [(call.args[0].value, call.args[1]) for call in sent["dlq"].await_args_list]
    assert dead[0][0] == b"{broken" and dead[0][1].kind == "malformed_json"
    assert dead[0][1].reason.startswith("not valid JSON")
    assert (dead[1][1].kind, dead[1][1].reason) == ("key_mismatch", "message key does not match user_id")
    assert len(dead) == 2
    assert forwarded(sent) == [Event("e1", "u1", 1704067200.0, "click", item_id="i")]


async def test_profiles_agent_updates_table_and_publishes_versioned_deltas(worker: WorkerApp,
                                                                         sent: dict[str, Any]) -> None:
    def bundle(eid: str, ts: float) -> bytes:
        return encode_bundle([Event(eid, "u1", ts, "click", category="shoes", item_id="i")])

    async with worker.agents["update_profiles"].test_context() as agent:
        await agent.put(bundle("e1", 0.0))
        await agent.put(bundle("e1", 0.0))  # duplicate delivery
        await agent.put(bundle("e2", 604800.0))
    deltas = published(sent["deltas"])
    # The duplicate re-emits the delta that counted it (v1) instead of making a new version.
    assert [(d["version"], d["event_ids"]) for d in deltas] == [(1, ["e1"]), (1, ["e1"]), (2, ["e2"])]
    assert worker.profiles["u1"]["version"] == 2
    assert worker.profiles["u1"]["activity"]["click"] == pytest.approx(1.0 + 2.0)  # relative to landmark 0


async def test_reviews_agent_encodes_drops_text_and_dead_letters_bad_reviews() -> None:
    encoder = FakeEncoder()
    worker = make_worker(encoder)
    with record_outputs(worker) as sent:
        review = {"event_id": "r1", "user_id": "u1", "ts": 100, "type": "review", "item_id": "i",
                  "text": "good fit", "rating": 5, "category": "dresses"}
        async with worker.agents["encode_reviews"].test_context() as agent:
            await agent.put(orjson.dumps(review), key=b"u1")
            await agent.put(orjson.dumps({**review, "event_id": "r2", "rating": 9}), key=b"u1")
            await agent.put(orjson.dumps({**review, "event_id": "r3", "text": "bad seams"}), key=b"u1")
    worker.encoder.stop()
    dead = [(call.args[1].kind, call.args[1].reason) for call in sent["dlq"].await_args_list]
    assert dead == [("bad_rating", "rating 9 is out of range 1-5")]
    assert [e.event_id for e in forwarded(sent)] == ["r1", "r3"]
    expected = [encoder.forward(encoder.tokenize([text]))[0] for text in ("good fit", "bad seams")]
    for event, encoded in zip(forwarded(sent), expected, strict=True):
        assert event.text is None  # review text does not travel past the encoder
        assert event.embedding == encoded.embedding and event.sentiment == encoded.sentiment
        assert event.rating == 5 and event.category == "dresses"


class PendingWrite(asyncio.Future[None]):
    """A changelog write the broker has not acknowledged yet."""

    message = MagicMock(partition=0)


async def until(condition: Callable[[], object], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_delta_is_published_only_after_its_table_write_is_stored(worker: WorkerApp) -> None:
    # Otherwise a crash between the two keeps the delta but loses the version it announces (see ProfileTable).
    writes: list[PendingWrite] = []
    writes_stored_when_published: list[bool] = []

    async def send_changelog(*_args: Any, **_kwargs: Any) -> PendingWrite:  # the producer's send, for the table
        writes.append(PendingWrite())
        return writes[-1]

    def publish(*args: Any, **kwargs: Any) -> list[asyncio.Future[None]]:
        writes_stored_when_published.append(all(write.done() for write in writes))
        return all_stored()

    event = Event("e1", "u1", 0.0, "click", item_id="i")
    with patch.object(worker.output, "deltas", new_callable=AsyncMock, side_effect=publish) as deltas, \
         batch_sends(worker, send_changelog):  # only the table uses it here
        async with worker.agents["update_profiles"].test_context() as agent:
            await agent.put(encode_bundle([event]), wait=False)
            await until(lambda: writes)
            writes[0].set_result(None)
            await until(lambda: deltas.await_count == 1)
    assert writes_stored_when_published == [True]
    assert [delta["version"] for delta in published(deltas)] == [1]


def review(index: int, text: str | None = None) -> bytes:
    return orjson.dumps({"event_id": f"r{index}", "user_id": "u1", "ts": 100 + index, "type": "review",
                         "item_id": "i", "text": text or f"review number {index}"})


async def test_a_full_review_micro_batch_goes_without_waiting_for_within() -> None:
    # `within` is far longer than the test's patience: only closing on size can produce the first batch.
    worker = make_worker(review_batch_max=2, review_batch_within_s=3600.0)
    with record_outputs(worker) as sent:
        async with worker.agents["encode_reviews"].test_context() as agent:
            for index in range(3):
                await agent.put(review(index), key=b"u1", wait=False)
            await until(lambda: sent["events"].await_count >= 1)
            batches = [[e.event_id for e in call.args[0]] for call in sent["events"].await_args_list]
    worker.encoder.stop()
    assert batches == [["r0", "r1"]]  # r2 waits for a partner or for `within`


async def test_a_partial_review_micro_batch_goes_once_within_has_passed() -> None:
    within = 0.5
    worker = make_worker(review_batch_max=100, review_batch_within_s=within)
    with record_outputs(worker) as sent:
        async with worker.agents["encode_reviews"].test_context() as agent:
            started = time.monotonic()
            await agent.put(review(0), key=b"u1", wait=False)
            await until(lambda: sent["events"].await_count >= 1)
            waited = time.monotonic() - started
    worker.encoder.stop()
    assert [e.event_id for e in forwarded(sent)] == ["r0"]
    assert waited >= within * 0.9  # a lower bound only: load can delay the batch, never hurry it


class PoisonSensitiveEncoder(FakeEncoder):
    """Fails any forward pass that contains the text 'poison', like a model choking on one input."""

    def forward(self, inputs: list[list[int]]) -> list[Any]:
        if any(b"poison" in bytes(ids) for ids in inputs):
            raise ValueError("cannot encode")
        return super().forward(inputs)


async def test_a_text_the_encoder_fails_on_is_dead_lettered_and_the_rest_of_its_batch_is_not() -> None:
    worker = make_worker(PoisonSensitiveEncoder(), review_batch_max=3, review_batch_within_s=3600.0)
    with record_outputs(worker) as sent:
        async with worker.agents["encode_reviews"].test_context() as agent:
            for index, text in enumerate(["fine one", "poison pill", "fine two"]):
                await agent.put(review(index, text), key=b"u1", wait=False)
            await until(lambda: sent["events"].await_count >= 1)
    worker.encoder.stop()
    dead = [(orjson.loads(call.args[0].value)["event_id"], call.args[1].kind, call.args[1].reason)
            for call in sent["dlq"].await_args_list]
    assert dead == [("r1", "encoder_error", "encoder failed on this text: ValueError")]
    assert [e.event_id for e in forwarded(sent)] == ["r0", "r2"]


class SendRejected(Exception):
    """What the broker answers for a record it refuses (e.g. over message.max.bytes)."""


@pytest.mark.parametrize("agent_name, message", [
    ("ingest", orjson.dumps({"event_id": "e1", "user_id": "u1", "ts": 1, "type": "click", "item_id": "i"})),
    ("ingest", b"{broken"),  # a dead letter
    ("encode_reviews", review(0)),
])
async def test_a_failed_send_fails_the_batch_instead_of_being_lost(agent_name: str, message: bytes,
                                                                   exits: list[int]) -> None:
    # The producer accepts the record and later reports it refused: the batch must not count as done (it is
    # acknowledged, and its offsets become committable, only after the agent yields for it).
    worker = make_worker()
    errors: list[BaseException] = []
    done: list[int] = []

    async def on_error(_agent: Any, exc: BaseException) -> None:
        errors.append(exc)

    async def send(*_args: Any, **_kwargs: Any) -> asyncio.Future[None]:
        refused = asyncio.get_running_loop().create_future()
        refused.set_exception(SendRejected("MessageSizeTooLarge"))
        return refused

    async def count(value: int) -> None:
        done.append(value)

    agent = worker.agents[agent_name]
    agent.add_sink(count)
    with patch.object(worker.app.producer, "send", side_effect=send) as producer_send:
        async with agent.test_context(on_error=on_error) as running:
            await running.put(message, key=b"u1", wait=False)
            await until(lambda: errors)
    worker.encoder.stop()
    assert producer_send.await_count >= 1
    assert [type(exc) for exc in errors] == [SendRejected]
    assert done == []
    assert exits == [70]  # the worker would end, and its input since the last commit come again


@pytest.mark.parametrize("refused", ["table write", "delta"])
async def test_a_failed_table_write_or_delta_fails_the_profile_batch(refused: str, exits: list[int]) -> None:
    worker = make_worker()
    errors: list[BaseException] = []
    done: list[int] = []

    async def on_error(_agent: Any, exc: BaseException) -> None:
        errors.append(exc)

    async def count(value: int) -> None:
        done.append(value)

    def result(failed: bool) -> asyncio.Future[None]:
        future = PendingWrite()  # a Future with the `message` Faust's table reads
        if failed:
            future.set_exception(SendRejected(refused))
        else:
            future.set_result(None)
        return future

    changelog = worker.profiles.changelog_topic.get_topic_name()

    async def send(topic: str, *_args: Any, **_kwargs: Any) -> asyncio.Future[None]:
        return result(refused == ("table write" if topic == changelog else "delta"))

    agent = worker.agents["update_profiles"]
    agent.add_sink(count)
    with batch_sends(worker, send):
        async with agent.test_context(on_error=on_error) as running:
            await running.put(encode_bundle([Event("e1", "u1", 0.0, "click", item_id="i")]), wait=False)
            await until(lambda: errors)
    worker.encoder.stop()
    assert [str(exc) for exc in errors] == [refused]
    assert done == []
    assert exits == [70]


async def test_batched_table_writes_are_the_records_faust_would_write(worker: WorkerApp) -> None:
    # Recovery and standbys read the changelog with Faust's codecs and partitioning: the records write_many sends
    # must be exactly those of `table[key] = value` (UTF-8 key, Faust's json codec, the default partitioner).
    from aiokafka.partitioner import DefaultPartitioner
    from faust.serializers import codecs

    value = {"user_id": "u1", "version": 3, "activity": {"click": 1.5}, "seen": {"e1": 3}, "embedding_num": None}
    with batch_sends(worker, send := MagicMock(side_effect=stored)):
        await worker.profiles.write_many({"u1": value, "user-two": value}, {"user-two": orjson.dumps(value)})
        await worker.profiles.confirm_writes()
    partitions = list(range(worker.settings.partitions))
    for call, key in zip(send.call_args_list, ("u1", "user-two"), strict=True):
        topic, sent_key, sent_value, partition = call.args[:4]
        assert topic == worker.profiles.changelog_topic.get_topic_name()
        assert sent_key == key.encode()
        assert sent_value == codecs.dumps("json", value)
        assert partition == DefaultPartitioner()(sent_key, partitions, partitions)
    assert worker.profiles["u1"] == value and worker.profiles["user-two"] == value


async def test_under_exactly_once_table_writes_take_fausts_own_path() -> None:
    worker = make_worker(processing_guarantee="exactly_once")
    with patch.object(worker.profiles, "send_changelog") as changelog:
        changelog.return_value.message.partition = 0
        await worker.profiles.write_many({"u1": {"version": 1}}, {})
    worker.encoder.stop()
    assert changelog.call_count == 1 and worker.profiles["u1"] == {"version": 1}


async def test_without_message_sensors_the_agents_work_and_no_per_message_hook_reaches_a_sensor() -> None:
    from faust.sensors import SensorDelegate

    from stream_app.ops.metrics import PER_MESSAGE_HOOKS, QuietSensors

    assert all(getattr(QuietSensors, hook) is not getattr(SensorDelegate, hook) for hook in PER_MESSAGE_HOOKS)
    worker = make_worker(faust_message_sensors=False)
    assert isinstance(worker.app.sensors, QuietSensors)
    sensor = MagicMock()
    worker.app.sensors.add(sensor)
    with record_outputs(worker) as sent:
        async with worker.agents["update_profiles"].test_context() as agent:
            await agent.put(encode_bundle([Event("e1", "u1", 0.0, "click", item_id="i")]))
    worker.encoder.stop()
    assert [delta["version"] for delta in published(sent["deltas"])] == [1]
    assert not {name for name, *_ in sensor.method_calls} & set(PER_MESSAGE_HOOKS)


async def test_deltas_leave_in_one_batch_per_partition_keyed_and_partitioned_as_a_plain_send(worker: WorkerApp) -> None:
    from aiokafka.partitioner import DefaultPartitioner

    deltas = [({"user_id": f"user-{i}", "version": 1, "as_of": 0.0, "event_ids": [f"e{i}"]}, i % 3 == 0)
              for i in range(40)]
    with batch_sends(worker, send := MagicMock(side_effect=stored)):
        futures = await worker.output.deltas(deltas)
        await asyncio.gather(*futures)
    partitions = list(range(worker.settings.partitions))
    sent = {call.args[1]: call.args for call in send.call_args_list}
    assert len(send.call_args_list) == len(sent) == 40
    assert len(futures) == len({args[3] for args in sent.values()}) > 1  # one future per partition batch
    for delta, _ in deltas:
        topic, key, value, partition = sent[str(delta["user_id"]).encode()][:4]
        assert topic == worker.topics.profile_deltas.get_topic_name()
        assert orjson.loads(value) == delta
        assert partition == DefaultPartitioner()(key, partitions, partitions)


def test_the_folds_table_lookup_answers_none_for_a_new_user_and_still_reaches_the_table_get_sensor(
    worker: WorkerApp,
) -> None:
    profiles = worker.profiles
    with patch.object(profiles, "_sensor_on_get") as on_get:
        assert profiles.stored("nobody") is None
        profiles.data["u1"] = {"user_id": "u1"}
        assert profiles.stored("u1") == {"user_id": "u1"} == profiles.get("u1")
    assert [call.args for call in on_get.call_args_list] == [(profiles, "nobody"), (profiles, "u1"), (profiles, "u1")]
