"""HTTP lookup on the worker: `GET /profiles/{user_id}?at=T`, answered by the worker that owns the key.

Faust's table router forwards a request for a key this worker does not own to the worker that does
(`canonical_url` of each worker must be reachable by the others: `PROFILE_WEB_CANONICAL_URL`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import faust
import orjson
from faust.web import Request, Response, View

from stream_app.core.decay import check_read_time
from stream_app.core.profile import ProfileState
from stream_app.worker.tables import ProfileTable

# The caller passes the real id (the table and its routing are keyed by it); the body carries the same
# (pseudonymised) id as deltas, snapshot and Redis do. docs/serving.md: "Pseudonymisation".


def parse_read_time(at_arg: str | None) -> float | None:
    """`?at=`: absent, or a finite epoch time in seconds inside 1970..2200 (ValueError with the reason)."""
    if at_arg is None:
        return None
    try:
        at = float(at_arg)
    except ValueError:
        raise ValueError(f"at={at_arg[:64]!r} is not a number of epoch seconds") from None
    return check_read_time(at)


def render(
    stored: dict[str, Any] | None, at: float | None, outgoing_user_id: Callable[[str], str]
) -> dict[str, Any] | None:
    if stored is None:
        return None
    view = ProfileState.from_dict(stored).view(at)
    view["user_id"] = outgoing_user_id(view["user_id"])
    return view


def register(app: faust.App, profiles: ProfileTable, outgoing_user_id: Callable[[str], str]) -> None:
    @app.page("/profiles/{user_id}")
    @app.table_route(table=profiles, match_info="user_id")
    async def get_profile(web: View, request: Request, user_id: str) -> Response:
        try:
            at = parse_read_time(request.query.get("at"))
        except ValueError as exc:
            return web.json({"error": str(exc)}, status=400)
        view = render(profiles.get(user_id), at, outgoing_user_id)
        if view is None:
            return web.json({"error": "unknown user", "user_id": outgoing_user_id(user_id)}, status=404)
        return web.bytes(orjson.dumps(view), content_type="application/json")
