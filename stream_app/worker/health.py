"""`GET /ready` on the worker, and what happens when an agent crashes.

`/ready` answers 200 once the worker has joined, recovered its tables and loaded what it serves with.
Orchestrators route traffic and benches start their clocks on this. Components that need time at start
(the review encoder) add a check to the worker's `readiness` map instead of this module knowing about them.

An agent that raises is dead for good in Faust (it logs `Crashed reason=...` and the worker stays up,
consuming nothing on that agent's topics: a zombie). Every agent is therefore supervised here: when one
raises, the crash is recorded (`/ready` answers 503 and names it) and the process exits at once with
`EXIT_AGENT_CRASHED`, or `EXIT_INCOMPATIBLE_STATE` when a stored profile was built under other settings.
The exit is immediate, like a kill -9, on purpose: the crashed micro-batch must not be acknowledged and
committed on the way out (Faust acks a `take_events` batch when its generator closes; the review agent takes its
batches that way, the others through `take_batches`, which never acknowledges a failed batch), so that a
restarted worker gets that input again; crash safety already covers a worker that vanishes
(docs/crash-safety.md).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final

import faust
from faust.types import AgentT, StreamT
from faust.web import Request, Response, View

from stream_app.core.profile import IncompatibleProfile

logger = logging.getLogger(__name__)

EXIT_AGENT_CRASHED: Final = 70  # EX_SOFTWARE: an agent raised; a restart gets the same input again
EXIT_INCOMPATIBLE_STATE: Final = 78  # EX_CONFIG: a stored profile needs other settings; a restart will not help


def readiness(app: faust.App, checks: Mapping[str, Callable[[], bool]]) -> dict[str, bool]:
    recovery = app.tables.recovery  # type: ignore[attr-defined]  # on the concrete TableManager only
    results = {
        "joined": app.rebalancing_count > 0 and not app.rebalancing,
        "tables_recovered": recovery.completed.is_set() and not app.in_recovery,
    }
    results.update({name: check() for name, check in checks.items()})
    return results


def exit_code_for(exc: BaseException) -> int:
    return EXIT_INCOMPATIBLE_STATE if isinstance(exc, IncompatibleProfile) else EXIT_AGENT_CRASHED


def exit_process(code: int) -> None:
    """End the process now: no shutdown path that could commit the offsets of the crashed batch."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def supervise(agent: AgentT, crashed: dict[str, str]) -> None:
    """Record a crash of `agent` in `crashed` and end the process (see the module docstring)."""
    fun = agent.fun

    @functools.wraps(fun)
    async def supervised(stream: StreamT[Any]) -> AsyncIterator[Any]:
        try:
            async for value in fun(stream):  # type: ignore[union-attr]  # our agents all yield
                yield value
        except Exception as exc:
            code = exit_code_for(exc)
            crashed[agent.name] = f"{type(exc).__name__}: {exc}"[:500]
            logger.critical("agent %s crashed (%s: %s); exiting with code %d so that a supervisor sees it "
                            "(input since the last commit is delivered again)",
                            agent.name, type(exc).__name__, exc, code, exc_info=exc)
            for handler in logging.getLogger().handlers:
                handler.flush()
            exit_process(code)
            raise

    agent.fun = supervised


def register(app: faust.App, checks: dict[str, Callable[[], bool]]) -> None:
    """`/ready`, and supervision of every agent registered so far (call it after the agents): the check
    `agents_running` joins `checks`."""
    crashed: dict[str, str] = {}
    for agent in app.agents.values():
        supervise(agent, crashed)
    checks["agents_running"] = lambda: not crashed

    @app.page("/ready")
    async def ready(web: View, request: Request) -> Response:
        results = readiness(app, checks)
        ok = all(results.values())
        body: dict[str, Any] = {"ready": ok, "checks": results}
        if crashed:
            body["crashed"] = dict(crashed)
        return web.json(body, status=200 if ok else 503)
