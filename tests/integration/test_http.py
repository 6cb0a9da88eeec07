"""HTTP lookup: any worker answers for any user (routed to the owner), in snapshot's format."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from typing import Any

import orjson
import pytest

from tests.integration.conftest import Stack

pytestmark = pytest.mark.integration


def get(port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:  # noqa: S310
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, orjson.loads(error.read())


def test_profiles_by_http_from_either_of_two_workers(stack: Stack) -> None:
    events = [{"event_id": f"h{i}", "user_id": f"user-{i % 8}", "ts": 1_700_000_000 + 10 * i, "type": "click",
               "item_id": "i", "category": ["shoes", "bags"][i % 2]} for i in range(64)]
    stack.start_worker()
    stack.start_worker()
    stack.produce(events)
    stack.wait_for_events({e["event_id"] for e in events}, timeout_s=90)
    snapshot = {p["user_id"]: p for p in stack.snapshot_cli()}
    at = 1_700_003_600.0
    aged = {p["user_id"]: p for p in stack.snapshot_cli("--at", str(at))}

    deadline = time.monotonic() + 60  # a rebalance between the two workers may still be settling
    while True:
        try:
            for port in stack.web_ports:
                for user, expected in snapshot.items():
                    assert get(port, f"/profiles/{user}") == (200, expected)
                    assert get(port, f"/profiles/{user}?at={at}") == (200, aged[user])
            break
        except (AssertionError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)

    status, body = get(stack.web_ports[0], "/profiles/nobody")
    assert status == 404 and body["error"] == "unknown user"
    status, body = get(stack.web_ports[1], "/profiles/user-1?at=soon")
    assert status == 400 and "not a finite epoch time" in body["error"]
