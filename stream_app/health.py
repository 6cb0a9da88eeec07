"""`GET /ready` on the worker: 200 once it has joined, recovered its tables and loaded what it serves with.

Orchestrators route traffic and benches start their clocks on this. Components that need time at start
(the review encoder) register a check here instead of this module knowing about them.
"""

from __future__ import annotations

from collections.abc import Callable

from faust.web import Request, Response, View

from stream_app.app import app

readiness_checks: dict[str, Callable[[], bool]] = {}


def readiness() -> dict[str, bool]:
    recovery = app.tables.recovery  # type: ignore[attr-defined]  # on the concrete TableManager only
    checks = {
        "joined": app.rebalancing_count > 0 and not app.rebalancing,
        "tables_recovered": recovery.completed.is_set() and not app.in_recovery,
    }
    checks.update({name: check() for name, check in readiness_checks.items()})
    return checks


@app.page("/ready")
async def ready(web: View, request: Request) -> Response:
    checks = readiness()
    return web.json({"ready": all(checks.values()), "checks": checks}, status=200 if all(checks.values()) else 503)
