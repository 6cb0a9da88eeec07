"""The serving side's guards without a broker: the web token decision and middleware on the worker's real
routes, Faust's built-in views switched off, secrets kept out of settings errors, the sink's metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pydantic import ValidationError

from stream_app.encoding.encoder import FakeEncoder
from stream_app.ops.settings import Settings
from stream_app.serving.redis_sink import SinkStats
from stream_app.serving.sink_metrics import serve_sink_metrics
from stream_app.worker.app import build_worker
from stream_app.worker.web import authorized

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "unit-test-web-token-0123456789"  # noqa: S105 - a test token


@pytest.mark.parametrize(("method", "path", "header", "token", "allowed"), [
    ("GET", "/profiles/u1", None, None, True),  # no token configured: open, as before
    ("GET", "/table/profiles/u1/", None, None, True),  # (not mounted at all, see below)
    ("GET", "/profiles/u1", None, TOKEN, False),
    ("GET", "/profiles/u1", f"Bearer {TOKEN}", TOKEN, True),
    ("GET", "/profiles/u1", f"bearer {TOKEN}", TOKEN, True),  # the scheme is case-insensitive (RFC 7235)
    ("GET", "/profiles/u1", f"Bearer {TOKEN}x", TOKEN, False),
    ("GET", "/profiles/u1", f"Bearer {TOKEN[:-1]}", TOKEN, False),
    ("GET", "/profiles/u1", TOKEN, TOKEN, False),  # no scheme
    ("GET", "/profiles/u1", f"Basic {TOKEN}", TOKEN, False),
    ("GET", "/profiles/u1", "Bearer ", TOKEN, False),
    ("GET", "/metrics", None, TOKEN, False),
    ("GET", "/ready", None, TOKEN, True),  # probes need no secret
    ("HEAD", "/ready", None, TOKEN, True),
    ("POST", "/ready", None, TOKEN, False),
    ("GET", "/ready/", None, TOKEN, False),
    ("GET", "/", None, TOKEN, False),
])
def test_the_access_decision(method: str, path: str, header: str | None, token: str | None, allowed: bool) -> None:
    assert authorized(method, path, header, token) is allowed


@pytest.fixture
async def worker_http(tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    """The worker's aiohttp application as `stream-app worker` builds it, on a test server (no broker)."""
    settings = Settings(web_token=TOKEN, data_dir=str(tmp_path), encoder_preload=False)
    app = build_worker(settings, encoder=FakeEncoder()).app
    app.web.init_server()
    async with TestClient(TestServer(app.web.web_app)) as client:
        yield client


def routes(client: TestClient[Any, Any]) -> set[str]:
    return {resource.canonical for resource in client.server.app.router.resources()}


async def test_faust_builtin_views_are_not_mounted_and_everything_but_ready_needs_the_token(
    worker_http: TestClient[Any, Any],
) -> None:
    # Everything the worker serves (/metrics is added by `stream-app worker`): Faust's /table, /router,
    # /graph, /performance and its statistics index are absent; "/" is Faust's {"status": "OK"}.
    assert routes(worker_http) == {"/", "/ready", "/profiles/{user_id}"}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/", "/profiles/u1", "/metrics", "/table/profiles/u1/", "/router/", "/graph", "/nothing"):
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}):
            response = await worker_http.get(path, headers=headers)
            assert response.status == 401, path
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert await response.json() == {"error": "missing or wrong bearer token"}
    for path in ("/table/profiles/u1/", "/table/", "/router/", "/router/profiles/", "/graph", "/performance/",
                 "/assignment/"):
        assert (await worker_http.get(path, headers=auth)).status == 404, path
    assert (await worker_http.get("/", headers=auth)).status == 200
    ready = await worker_http.get("/ready")
    assert ready.status in (200, 503) and "checks" in await ready.json()  # not joined: 503, but not refused


@pytest.mark.parametrize(("env", "secret"), [
    ({"PROFILE_PSEUDONYM_KEY": "short-key-x1"}, "short-key-x1"),
    ({"PROFILE_WEB_TOKEN": "tiny-tok-9"}, "tiny-tok-9"),
    ({"PROFILE_SECURITY_PROTOCOL": "SASL_SSL", "PROFILE_SASL_PASSWORD": "sasl-pass-Zq8"}, "sasl-pass-Zq8"),
    ({"PROFILE_SASL_MECHANISM": "sasl-mech-Zq8", "PROFILE_SASL_PASSWORD": "sasl-pass-Zq8"}, "sasl-"),
    ({"PROFILE_SECURITY_PROTOCOL": "plaintext-Zq8", "PROFILE_SASL_USERNAME": "u",
      "PROFILE_SASL_PASSWORD": "sasl-pass-Zq8"}, "Zq8"),
    ({"PROFILE_PSEUDONYM_KEY": "long-enough-pseudonym-key", "PROFILE_WEB_PORT": "not-a-port-Zq8"}, "Zq8"),
])
def test_a_rejected_setting_never_echoes_a_value(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                                 secret: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as raised:
        Settings()
    # What gets printed or logged. (`.errors()` is pydantic's structured API and still holds the input: nothing
    # of ours calls it, and `errors(include_input=False)` is the form to use if something ever does.)
    text = str(raised.value) + repr(raised.value) + str(raised.value.errors(include_input=False))
    assert "PROFILE_" in text or "Input should be" in text  # the reason is there ...
    assert secret not in text  # ... the value is not
    assert "long-enough-pseudonym-key" not in text


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_worker_refuses_a_bad_secret_setting_without_printing_it(log_format: str) -> None:
    secret = "short-Zq8"  # noqa: S105 - a fake secret under 16 characters
    env = {**os.environ, "PROFILE_PSEUDONYM_KEY": secret, "PROFILE_SASL_PASSWORD": "worker-sasl-pass-Zq8",
           "PROFILE_LOG_FORMAT": log_format}
    done = subprocess.run([sys.executable, "-m", "stream_app.cli", "worker"], cwd=ROOT, env=env,
                          capture_output=True, timeout=120)
    output = (done.stdout + done.stderr).decode()
    assert done.returncode == 2, output
    assert "invalid settings" in output and "PROFILE_PSEUDONYM_KEY needs at least 16 characters" in output
    assert "Zq8" not in output
    assert "Traceback" not in output


def test_sink_metrics_are_served_on_their_own_port() -> None:
    stats = SinkStats(deltas=9, applied=5, skipped=1, resynced=1, unrepaired=1, conflicts=2, malformed=1, foreign=1,
                      reconnects=3)
    server, thread = serve_sink_metrics(stats, 0, "127.0.0.1")
    try:
        port = server.server_port
        stats.applied += 1  # read at scrape time
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:  # noqa: S310
            text = response.read().decode()
    finally:
        server.shutdown()
        thread.join(timeout=10)
    samples = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
               if line.startswith("profile_sink_")}
    assert samples == {"profile_sink_deltas_total": 9, "profile_sink_applied_total": 6, "profile_sink_skipped_total": 1,
                       "profile_sink_resynced_total": 1, "profile_sink_unrepaired_total": 1,
                       "profile_sink_conflicts_total": 2, "profile_sink_malformed_total": 1,
                       "profile_sink_foreign_total": 1, "profile_sink_reconnects_total": 3}
