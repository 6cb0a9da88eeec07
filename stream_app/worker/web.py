"""HTTP lookup on the worker: `GET /profiles/{user_id}?at=T`, answered by the worker that owns the key.

Faust's table router forwards a request for a key this worker does not own to the worker that does
(`canonical_url` of each worker must be reachable by the others: `PROFILE_WEB_CANONICAL_URL`). The forwarded
request carries the caller's headers, its `Authorization` included, so routing works with a web token.

Access (docs/serving.md, "Access control"): with `PROFILE_WEB_TOKEN` set, every route but `GET /ready` needs
`Authorization: Bearer <token>`, checked by an aiohttp middleware before any view runs (so unknown paths,
`/metrics` and Faust's own index answer 401 too). Faust's built-in views that show table values (`/table`)
or the cluster (`/router`, `/graph`, the statistics at `/`, `/performance`) are never mounted: the table
router that forwards lookups works from the partition assignment, not from the `/router` view.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any, Final

import faust
import orjson
from aiohttp import web as aiohttp_web
from faust.web import Request, Response, View

from stream_app.core.decay import check_read_time
from stream_app.core.profile import ProfileState
from stream_app.worker.tables import ProfileTable

OPEN_ROUTES: Final = frozenset({("GET", "/ready"), ("HEAD", "/ready")})  # orchestrators probe without a secret
BEARER: Final = "Bearer "
# Every built-in Faust blueprint has a flag; all off. Left on, `/table/profiles/{id}/` returns the raw table
# value (real ids, the outbox, the seen event ids) and `/router/` lists every worker's URL.
BUILTIN_VIEWS_OFF: Final = {
    "web_router_enabled": False,
    "web_tables_enabled": False,
    "web_graph_enabled": False,
    "web_stats_enabled": False,  # `/` is then Faust's production index: {"status": "OK"}, behind the token
    "web_metrics_enabled": False,
}


def authorized(method: str, path: str, authorization: str | None, token: str | None) -> bool:
    """The access decision for one request: open without a token, else the token or an open route."""
    if token is None or (method.upper(), path) in OPEN_ROUTES:
        return True
    if authorization is None or authorization[:len(BEARER)].lower() != BEARER.lower():  # the scheme is case-blind
        return False
    # Constant time in the content: the time taken does not tell how much of a guess was right.
    return hmac.compare_digest(authorization[len(BEARER):].strip().encode(), token.encode())


Handler = Callable[[aiohttp_web.Request], Awaitable[aiohttp_web.StreamResponse]]


def auth_middleware(token: str) -> Callable[[aiohttp_web.Request, Handler], Awaitable[aiohttp_web.StreamResponse]]:
    @aiohttp_web.middleware
    async def require_token(request: aiohttp_web.Request, handler: Handler) -> aiohttp_web.StreamResponse:
        if authorized(request.method, request.path, request.headers.get("Authorization"), token):
            return await handler(request)
        return aiohttp_web.json_response({"error": "missing or wrong bearer token"}, status=401,
                                         headers={"WWW-Authenticate": 'Bearer realm="user-profiles"'})

    return require_token


def faust_web_config(token: str | None) -> dict[str, Any]:
    """Faust settings of the HTTP server: built-in views off, and the token middleware when there is a token."""
    config: dict[str, Any] = dict(BUILTIN_VIEWS_OFF)
    if token is not None:
        config["web_application_options"] = {"middlewares": [auth_middleware(token)]}
    return config


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
