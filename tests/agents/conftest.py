"""Agent tests drive real agents in this process: an agent that crashes must not end the test run."""

from __future__ import annotations

import pytest

from stream_app.worker import health


@pytest.fixture(autouse=True)
def exits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The exit codes a crashed agent asked for (the worker would end its process with them)."""
    codes: list[int] = []
    monkeypatch.setattr(health, "exit_process", codes.append)
    return codes
