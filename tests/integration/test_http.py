"""HTTP lookup: any worker answers for any user (routed to the owner), in snapshot's format."""

from __future__ import annotations

import pytest

from tests.integration.conftest import Stack, eventually, http_get

pytestmark = pytest.mark.integration


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

    def every_worker_answers_for_every_user() -> None:
        for port in stack.web_ports:
            for user, expected in snapshot.items():
                assert http_get(port, f"/profiles/{user}") == (200, expected)
                assert http_get(port, f"/profiles/{user}?at={at}") == (200, aged[user])

    eventually(every_worker_answers_for_every_user)  # a rebalance between the two workers may still be settling

    status, body = http_get(stack.web_ports[0], "/profiles/nobody")
    assert status == 404 and body["error"] == "unknown user"
    status, body = http_get(stack.web_ports[1], "/profiles/user-1?at=soon")
    assert status == 400 and body["error"] == "at='soon' is not a number of epoch seconds"
    for bad in ("nan", "inf", "-1", "7258118400", "1e300"):
        status, body = http_get(stack.web_ports[1], f"/profiles/user-1?at={bad}")
        assert status == 400 and body["error"].startswith("read time "), (bad, body)
        assert "not a finite" in body["error"] or "outside 1970-01-01..2200-01-01" in body["error"]
    # In range but years before the profile (was a 500 with an OverflowError): reads at as_of.
    user = next(iter(snapshot))
    assert http_get(stack.web_ports[0], f"/profiles/{user}?at=0") == (200, snapshot[user])
