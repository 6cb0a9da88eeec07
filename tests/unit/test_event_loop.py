"""The worker's event loop (PROFILE_EVENT_LOOP, stream_app/worker/run.py)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator

import pytest
import uvloop
from pydantic import ValidationError

from stream_app.ops.settings import Settings
from stream_app.worker.run import use_event_loop


@pytest.fixture
def restored_policy() -> Iterator[None]:
    before = asyncio.get_event_loop_policy()
    yield
    asyncio.set_event_loop_policy(before)


def test_uvloop_is_the_default_and_runs_what_the_worker_starts(restored_policy: None) -> None:
    use_event_loop(Settings().event_loop)

    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    assert asyncio.run(loop_type()) is uvloop.Loop


def test_asyncio_leaves_the_standard_loop(restored_policy: None) -> None:
    use_event_loop(Settings(event_loop="asyncio").event_loop)

    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    assert not issubclass(asyncio.run(loop_type()), uvloop.Loop)


def test_an_unknown_loop_is_refused() -> None:
    with pytest.raises(ValidationError, match="event_loop"):
        Settings(event_loop="trio")


def test_uvloop_missing_is_a_clear_start_up_error(restored_policy: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # what an install without it looks like to `import`
    with pytest.raises(SystemExit, match="PROFILE_EVENT_LOOP=uvloop but uvloop is not installed"):
        use_event_loop("uvloop")
