"""A replay runs beside the live worker: its own app id and outputs, and no port of the live worker's."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_app.ops.settings import Settings
from stream_app.tools.replay import ReplayPlan
from stream_app.worker.app import faust_config


def test_replay_worker_gets_its_own_app_id_outputs_and_no_live_web_port(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PROFILE_WEB_PORT", "6066")  # the live worker's, inherited from the shell
    live = Settings(app_id="live", web_port=6066, web_canonical_url="http://live:6066")
    env = ReplayPlan.create(live, "nightly").worker_env(tmp_path)
    assert env["PROFILE_APP_ID"] == "live-replay-nightly"
    assert env["PROFILE_TOPIC_DELTAS"] == "profile-deltas-replay-nightly"
    assert env["PROFILE_TOPIC_CLICKS"] == "clicks"  # from the live topics
    assert "PROFILE_WEB_PORT" not in env and "PROFILE_WEB_CANONICAL_URL" not in env
    assert env["PROFILE_DATA_DIR"] == str(tmp_path)


def test_replay_refuses_the_live_delta_topic() -> None:
    with pytest.raises(ValueError, match="must not write to the live delta topic"):
        ReplayPlan.create(Settings(), "x", output_topic="profile-deltas")


def test_http_binds_only_the_configured_address() -> None:
    config = faust_config(Settings(web_host="127.0.0.1", web_port=7001))
    assert config["web_bind"] == "127.0.0.1" and config["web_port"] == 7001
