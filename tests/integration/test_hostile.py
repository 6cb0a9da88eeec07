"""Hostile input against a real worker: every bad message is a dead letter, good ones still count, the
worker survives, /metrics tells the story, and the logs hold neither payloads nor secrets."""

from __future__ import annotations

import time
import urllib.request
from collections import Counter
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.hostile_corpus import CANARY, Hostile, hostile_corpus
from tests.integration.conftest import Stack

pytestmark = pytest.mark.integration

SASL_CANARY = "sasl-pw-Kq81-canary"


def good_event(i: int) -> dict[str, Any]:
    if i % 3 == 2:
        return {"event_id": f"good-{i}", "user_id": f"user-{i % 5}", "ts": 1_700_000_000 + i, "type": "search",
                "query": "red shoes", "category": "shoes"}
    return {"event_id": f"good-{i}", "user_id": f"user-{i % 5}", "ts": 1_700_000_000 + i, "type": "click",
            "item_id": f"item-{i}", "category": "shoes"}


def wire_corpus(stack: Stack) -> list[Hostile]:
    # Review-topic entries stay in the unit tests while the review path is being reworked.
    return [case for case in hostile_corpus(stack.settings) if case.topic in ("click", "search")]


def wait_for_dead_letters(stack: Stack, count: int, timeout_s: float = 60.0) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        letters = stack.records(stack.settings.topic_dead_letters)
        if len(letters) >= count or time.monotonic() > deadline:
            return letters
        time.sleep(0.5)


def scrape(stack: Stack, worker: int = 0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = f"http://127.0.0.1:{stack.web_ports[worker]}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - our own worker on loopback
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_the_whole_corpus_is_dead_lettered_and_good_events_interleaved_with_it_count(stack: Stack) -> None:
    corpus = wire_corpus(stack)
    worker = stack.start_worker()
    good: list[dict[str, Any]] = []
    for i, case in enumerate(corpus):
        good.extend(stack.produce([good_event(i)]))
        stack.produce_raw(case.topic_name(stack.settings), case.value, case.key)
    stack.flush()
    deltas = stack.wait_for_events({e["event_id"] for e in good})
    counted = {eid for d in deltas for eid in d["event_ids"]}
    assert counted == {e["event_id"] for e in good}  # nothing from the corpus reached a profile

    letters = wait_for_dead_letters(stack, len(corpus))
    assert len(letters) == len(corpus)
    expected = {(case.topic_name(stack.settings), case.key, case.value or b""): case for case in corpus}
    assert len(expected) == len(corpus)
    inputs = {(topic, r.partition, r.offset): r for topic in (stack.settings.topic_clicks,
                                                               stack.settings.topic_searches)
              for r in stack.records(topic)}
    seen: set[str] = set()
    for letter in letters:
        headers = {name: value.decode() for name, value in letter.headers}
        case = expected[(headers["dlq.topic"], letter.key, letter.value or b"")]
        assert headers["dlq.reason"] == case.reason, case.name
        # The headers point at the original message, and its bytes came through untouched.
        original = inputs[(headers["dlq.topic"], int(headers["dlq.partition"]), int(headers["dlq.offset"]))]
        assert (original.key, original.value) == (letter.key, letter.value), case.name
        seen.add(case.name)
    assert seen == {case.name for case in corpus}
    dead = {dict(labels)["kind"]: value for (name, labels), value in scrape(stack).items()
            if name == "profile_dead_letters_total"}
    assert dead == Counter(case.kind for case in corpus)

    # Still alive and still processing.
    assert worker.poll() is None
    late = stack.produce([{**good_event(0), "event_id": "after-the-storm"}])
    stack.wait_for_events({e["event_id"] for e in late})
    assert worker.poll() is None


def test_metrics_endpoint_counts_events_and_dead_letter_kinds(stack: Stack) -> None:
    clicks = [good_event(i) for i in range(12) if good_event(i)["type"] == "click"]
    searches = [good_event(i) for i in range(12) if good_event(i)["type"] == "search"]
    [year_9999] = [case for case in wire_corpus(stack) if case.name == "ts_year_9999"]
    stack.start_worker()
    stack.produce(clicks + searches)
    stack.produce_raw(year_9999.topic_name(stack.settings), year_9999.value, year_9999.key)
    stack.flush()
    stack.wait_for_events({e["event_id"] for e in clicks + searches})
    wait_for_dead_letters(stack, 1)

    deadline = time.monotonic() + 20
    while True:
        metrics = scrape(stack)
        dead = {labels: value for (name, labels), value in metrics.items() if name == "profile_dead_letters_total"}
        if dead or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert metrics[("profile_events_total", (("type", "click"),))] == len(clicks)
    assert metrics[("profile_events_total", (("type", "search"),))] == len(searches)
    assert dead == {(("kind", "bad_timestamp"),): 1.0}
    assert any(name.startswith("faust_") for name, _ in metrics)  # Faust's own sensor is on the same page


def test_json_logs_hold_neither_payloads_nor_secrets(make_stack: Any) -> None:
    stack = make_stack(PROFILE_LOG_LEVEL="INFO", PROFILE_LOG_FORMAT="json", PROFILE_SASL_PASSWORD=SASL_CANARY)
    corpus = {case.name: case for case in wire_corpus(stack)}
    canary_cases = [corpus["malformed_review_with_canary"], corpus["review_on_searches"]]
    assert all(CANARY.encode() in (case.value or b"") for case in canary_cases)
    worker = stack.start_worker()
    for case in canary_cases:
        stack.produce_raw(case.topic_name(stack.settings), case.value, case.key)
    good = stack.produce([good_event(1)])
    stack.wait_for_events({good[0]["event_id"]})
    wait_for_dead_letters(stack, len(canary_cases))
    stack.stop_worker(worker)  # shutdown logs too

    log = (stack.workdir / "worker-0.log").read_text()
    lines = [line for line in log.splitlines() if line.strip()]
    assert len(lines) > 10  # INFO: Faust logs its start, assignment and shutdown
    for line in lines:
        doc = orjson.loads(line)
        assert {"ts", "level", "logger", "message"} <= set(doc)
    assert CANARY not in log
    assert SASL_CANARY not in log
