"""`GET /ready` on the worker: 200 once it has joined, recovered its tables and loaded what it serves with.

Orchestrators route traffic and benches start their clocks on this. Components that need time at start
(the review encoder) add a check to the worker's `readiness` map instead of this module knowing about them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import faust
from faust.web import Request, Response, View


def readiness(app: faust.App, checks: Mapping[str, Callable[[], bool]]) -> dict[str, bool]:
    recovery = app.tables.recovery  # type: ignore[attr-defined]  # on the concrete TableManager only
    results = {
        "joined": app.rebalancing_count > 0 and not app.rebalancing,
        "tables_recovered": recovery.completed.is_set() and not app.in_recovery,
    }
    results.update({name: check() for name, check in checks.items()})
    return results


def register(app: faust.App, checks: Mapping[str, Callable[[], bool]]) -> None:
    @app.page("/ready")
    async def ready(web: View, request: Request) -> Response:
        results = readiness(app, checks)
        ok = all(results.values())
        return web.json({"ready": ok, "checks": results}, status=200 if ok else 503)
