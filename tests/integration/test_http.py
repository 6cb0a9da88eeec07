"""HTTP lookup: any worker answers for any user (routed to the owner), in snapshot's format; with a web token,
only /ready is open, routing between workers keeps working and Faust's raw views are not served."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

import orjson
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


TOKEN = "integration-web-token-0123456789"  # noqa: S105 - a test token


def get(port: int, path: str, token: str | None = None) -> tuple[int, bytes]:
    """Status and raw body of a GET on a worker's HTTP port, with a bearer token if given."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_with_a_web_token_only_ready_is_open_and_lookups_still_route_between_two_workers(make_stack: Any) -> None:
    stack = make_stack(PROFILE_WEB_TOKEN=TOKEN)
    events = [{"event_id": f"t{i}", "user_id": f"user-{i % 8}", "ts": 1_700_000_000 + 10 * i, "type": "click",
               "item_id": "i", "category": "shoes"} for i in range(32)]
    stack.start_worker()
    stack.start_worker()
    stack.produce(events)
    stack.wait_for_events({e["event_id"] for e in events}, timeout_s=90)
    snapshot = {p["user_id"]: p for p in stack.snapshot_cli()}
    assert len(snapshot) == 8

    def every_worker_answers_for_every_user_with_the_token() -> None:
        # Half of the users live on the other worker: their lookups are forwarded with the caller's header.
        for port in stack.web_ports:
            assert get(port, "/ready")[0] == 200  # open: no token
            for user, expected in snapshot.items():
                status, body = get(port, f"/profiles/{user}", TOKEN)
                assert (status, orjson.loads(body)) == (200, expected)

    eventually(every_worker_answers_for_every_user_with_the_token)
    for port in stack.web_ports:
        for path in ("/profiles/user-1", "/metrics", "/", "/table/profiles/user-1/", "/router/"):
            for token in (None, "wrong-token-0123456789abcdef", TOKEN[:-1]):
                status, body = get(port, path, token)
                assert status == 401, (path, token)
                assert b"user-1" not in body and b"shoes" not in body
        status, body = get(port, "/metrics", TOKEN)
        assert status == 200 and b"profile_events_total" in body
        # Faust's raw table and cluster views are not mounted at all: 404 even with the token.
        for path in ("/table/profiles/user-1/", "/table/", "/router/", "/router/profiles/", "/graph",
                     "/performance/"):
            status, body = get(port, path, TOKEN)
            assert status == 404, path
            assert b"user-1" not in body and b"event_ids" not in body and b"outbox" not in body
    # A worker's own log never holds the token (it is a SecretStr: the log filter masks it).
    assert TOKEN not in stack.worker_log(0) + stack.worker_log(1)
