"""The ingest agent folds events already on their user's by-user partition; the rest take the hop
(stream_app/worker/folding.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from unittest.mock import patch

import orjson
import pytest
from faust.types import TP, Message

from schemas.events import Event
from stream_app.kafka.partitioning import partition_for_user
from stream_app.ops import metrics
from stream_app.worker.app import WorkerApp
from tests.agents.test_agents import forwarded, make_worker, published, record_outputs


def user_on(partition: int, partitions: int, avoid: int | None = None) -> str:
    """A user id whose by-user partition is `partition` (or, with `avoid`, any partition but that one)."""
    for n in range(1000):
        user = f"user-{n}"
        home = partition_for_user(user, partitions)
        if (home == partition) if avoid is None else (home != avoid):
            return user
    raise AssertionError("no such user")


def click(event_id: str, user: str) -> bytes:
    return orjson.dumps({"event_id": event_id, "user_id": user, "ts": 1.7e9, "type": "click", "item_id": "i",
                         "category": "shoes"})


@contextmanager
def holding(worker: WorkerApp, by_user_partitions: set[int], input_partitions: int | None = None) -> Iterator[None]:
    """This worker holds these by-user partitions and sees input topics with `input_partitions` partitions."""
    by_user = worker.topics.events_by_user.get_topic_name()
    with ExitStack() as stack:
        stack.enter_context(patch.object(worker.app.assignor, "assigned_actives",
                                         return_value={TP(by_user, p) for p in by_user_partitions}))
        stack.enter_context(patch.object(worker.app.consumer, "topic_partitions",
                                         return_value=input_partitions or worker.settings.partitions))
        yield


async def put_clicks(worker: WorkerApp, clicks: list[tuple[bytes, int]]) -> None:
    async with worker.agents["ingest"].test_context() as agent:
        for value, partition in clicks:
            await agent.put(value, key=orjson.loads(value)["user_id"].encode(), partition=partition)


async def test_an_event_on_its_users_partition_is_folded_at_ingest_and_the_others_take_the_hop() -> None:
    worker = make_worker()
    partitions = worker.settings.partitions
    here, away = user_on(2, partitions), user_on(0, partitions, avoid=1)
    folded_before = metrics.FOLDED_AT_INGEST._value.get()
    with holding(worker, set(range(partitions))), record_outputs(worker) as sent:
        await put_clicks(worker, [(click("e-here", here), 2), (click("e-away", away), 1)])
    worker.encoder.stop()
    assert [e.event_id for e in forwarded(sent)] == ["e-away"]  # came in on partition 1, its user is elsewhere
    assert [(d["user_id"], d["version"], d["event_ids"]) for d in published(sent["deltas"])] == [(here, 1, ["e-here"])]
    assert worker.profiles[here]["version"] == 1 and worker.profiles.get(away) is None
    writes = [(call.args[1], call.args[3]) for call in sent["changelog"].call_args_list]
    assert writes == [(here.encode(), 2)]  # the table partition the profile agent would have written
    assert metrics.FOLDED_AT_INGEST._value.get() == folded_before + 1


@pytest.mark.parametrize("case", ["setting off", "partition not held", "input partitions differ", "exactly_once"])
async def test_otherwise_every_event_takes_the_hop(case: str) -> None:
    worker = make_worker(fold_at_ingest=case != "setting off",
                         processing_guarantee="exactly_once" if case == "exactly_once" else "at_least_once")
    partitions = worker.settings.partitions
    here = user_on(2, partitions)
    held = set(range(partitions)) - ({2} if case == "partition not held" else set())
    with holding(worker, held, partitions * 2 if case == "input partitions differ" else None), \
         record_outputs(worker) as sent:
        await put_clicks(worker, [(click("e1", here), 2)])
    worker.encoder.stop()
    assert [e.event_id for e in forwarded(sent)] == ["e1"]
    assert published(sent["deltas"]) == [] and worker.profiles.get(here) is None


async def test_two_agents_folding_one_user_take_turns_and_publish_versions_in_order() -> None:
    worker = make_worker()
    stored_once = asyncio.Event()
    confirmations = 0
    original_confirm = worker.profiles.confirm_writes

    async def slow_first_confirmation() -> None:
        nonlocal confirmations
        confirmations += 1
        if confirmations == 1:
            await stored_once.wait()  # the broker is slow to store the first fold's writes
        await original_confirm()

    first = Event("e1", "u1", 1.7e9, "click", item_id="i")
    second = Event("e2", "u1", 1.7e9 + 1, "click", item_id="i")
    message = Message("clicks", 0, 0, 0.0, 0, None, b"u1", b"{}", b"")
    with record_outputs(worker) as sent, \
         patch.object(worker.profiles, "confirm_writes", side_effect=slow_first_confirmation):
        ingest_fold = asyncio.ensure_future(worker.folder.fold([first], {id(first): message}))
        await asyncio.sleep(0.01)
        profile_fold = asyncio.ensure_future(worker.folder.fold([second], {id(second): message}))
        await asyncio.sleep(0.01)
        assert worker.profiles["u1"]["version"] == 1  # the second fold has not read the state yet
        assert published(sent["deltas"]) == []
        stored_once.set()
        await asyncio.wait_for(asyncio.gather(ingest_fold, profile_fold), 5)
    worker.encoder.stop()
    assert [(d["version"], d["event_ids"]) for d in published(sent["deltas"])] == [(1, ["e1"]), (2, ["e2"])]


async def test_an_encoded_review_on_its_users_partition_is_folded_by_the_review_agent() -> None:
    from stream_app.encoding.encoder import FakeEncoder

    encoder = FakeEncoder()
    worker = make_worker(encoder)
    partitions = worker.settings.partitions
    here, away = user_on(1, partitions), user_on(0, partitions, avoid=3)
    review = {"event_id": "r-here", "user_id": here, "ts": 1.7e9, "type": "review", "item_id": "i",
              "text": "good fit", "rating": 5}
    with holding(worker, set(range(partitions))), record_outputs(worker) as sent:
        async with worker.agents["encode_reviews"].test_context() as agent:
            await agent.put(orjson.dumps(review), key=here.encode(), partition=1)
            await agent.put(orjson.dumps({**review, "event_id": "r-away", "user_id": away}), key=away.encode(),
                            partition=3)
    worker.encoder.stop()
    assert [e.event_id for e in forwarded(sent)] == ["r-away"]
    [delta] = published(sent["deltas"])
    encoded = encoder.forward(encoder.tokenize(["good fit"]))[0]
    assert (delta["user_id"], delta["version"], delta["event_ids"]) == (here, 1, ["r-here"])
    assert delta["sentiment"][0] == pytest.approx(encoded.sentiment)  # (weighted sum, weight) of one review
    assert delta["embedding"]["num"] == pytest.approx(list(encoded.embedding))
    assert worker.profiles[here]["version"] == 1 and worker.profiles.get(away) is None
