"""Every record on every topic the worker writes stays under PROFILE_MAX_RECORD_BYTES, and profiles stay exact.

The worker is started WITHOUT PROFILE_EMBEDDED_BROKER: it must find out itself that the broker is Tansu.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from stream_app.core.profile import ProfileState
from tests.integration.conftest import Stack

pytestmark = pytest.mark.integration

LIMIT = 64 * 1024


def backlog() -> list[dict[str, Any]]:
    bot = [{"event_id": f"c{i:05d}", "user_id": "bot", "ts": 1.7e9 + i, "type": "click",
            "category": f"category-{i:05d}", "item_id": "i"} for i in range(2000)]
    bot += [{"event_id": f"s{i:05d}", "user_id": "bot", "ts": 1.7e9 + 2000 + i, "type": "search",
             "query": " ".join(f"term{i:03d}w{j:02d}" for j in range(40))} for i in range(300)]
    words = "soft fabric runs small but the colour is lovely and the seams held after many washes".split()
    reviews = [{"event_id": f"r{i:05d}", "user_id": "reviewer", "ts": 1.7e9 + i, "type": "review", "item_id": "i",
                "rating": 1 + i % 5, "text": " ".join(words[(i + j) % len(words)] for j in range(1600))[:10_000]}
               for i in range(300)]
    return bot + reviews


def record_size(record: Any) -> int:
    headers = [(k, v) for k, v in (record.headers or [])]
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(record.key, record.value, headers))


def test_a_big_backlog_writes_only_records_under_the_limit_and_exact_profiles(make_stack: Any) -> None:
    stack: Stack = make_stack(PROFILE_MAX_RECORD_BYTES=str(LIMIT), PROFILE_EMBEDDED_BROKER="false")
    events = stack.produce(backlog())
    oversized = b'{"pad": "' + b"x" * (3 * LIMIT) + b'"}'
    stack.produce_raw(stack.settings.topic_clicks, oversized, b"u1")
    stack.flush()
    stack.start_worker()
    stack.wait_for_events({e["event_id"] for e in events}, timeout_s=600)
    worker_logs = "".join(path.read_text(errors="replace") for path in stack.workdir.glob("worker-*.log"))
    assert "it is the embedded Tansu broker" in worker_logs

    settings = stack.settings
    topics = [settings.topic_events_by_user, f"{settings.app_id}-profiles-changelog", settings.topic_deltas,
              settings.topic_dead_letters]
    sizes = {topic: [record_size(r) for r in stack.records(topic)] for topic in topics}
    print({topic: (len(found), max(found)) for topic, found in sizes.items()})
    assert all(sizes.values())
    assert max(max(found) for found in sizes.values()) <= LIMIT

    (dead,) = stack.records(settings.topic_dead_letters)
    headers = {k: v for k, v in dead.headers}
    assert headers["dlq.kind"] == b"too_large" and headers["dlq.original_size"] == str(len(oversized)).encode()
    assert oversized.startswith(dead.value)

    deltas = stack.deltas()
    assert max(d["version"] for d in deltas if d["user_id"] == "bot") > 10  # split into many versions
    replicas = stack.replicas()
    assert replicas.gaps == []
    table = stack.table()
    assert set(table) == {"bot", "reviewer"}
    for user_id, state in table.items():
        assert replicas.profiles[user_id].view() == state.view()
        assert isinstance(state, ProfileState)
    assert sum(table["bot"].view()["activity"].values()) > 0
