"""Reading one record of a delta topic: a `Delta` the replica can apply, or a clear reason why not.

The delta topic is written by our workers only, but it is a Kafka topic: anyone with write access can put a
record there, and one bad record must not stop every reader (the subscriber would crash-loop on it, never
committing past it). The check covers what `stream_app.core.replica.apply_delta` relies on (types of every
field it reads), not the whole contract (schemas/delta.schema.json): that would cost more per delta than
applying it. Reasons name the field, never the value: a record's payload stays out of the logs.
"""

from __future__ import annotations

import math
from typing import Any, Final

import orjson

from stream_app.core.profile import MEAN_FIELDS, Delta

SUM_FIELDS: Final = ("activity", "interests", "keywords")


class MalformedDelta(ValueError):
    """A delta record that cannot be applied; the message is safe to log (no payload)."""


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_delta(raw: bytes | str) -> Delta:
    try:
        delta = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise MalformedDelta("not JSON") from None
    if not isinstance(delta, dict):
        raise MalformedDelta(f"a JSON {type(delta).__name__}, not an object")
    user_id, version = delta.get("user_id"), delta.get("version")
    if not isinstance(user_id, str) or not user_id:
        raise MalformedDelta("user_id missing or not a non-empty string")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise MalformedDelta("version missing or not an integer >= 1")
    for name in ("as_of", "landmark", "half_life_s"):
        if not _number(delta.get(name)):
            raise MalformedDelta(f"{name} missing or not a finite number")
    if delta["half_life_s"] <= 0:
        raise MalformedDelta("half_life_s not > 0")
    for name in SUM_FIELDS:
        sums = delta.get(name)
        if sums is not None and not (isinstance(sums, dict) and all(_number(v) for v in sums.values())):
            raise MalformedDelta(f"{name} not an object of finite numbers")
    dropped = delta.get("dropped", {})
    if not isinstance(dropped, dict) or not all(
        name in SUM_FIELDS and isinstance(keys, list) and all(isinstance(k, str) for k in keys)
        for name, keys in dropped.items()
    ):
        raise MalformedDelta("dropped not an object of string lists per sum field")
    for name in MEAN_FIELDS:
        pair = delta.get(name)
        if name in delta and not (isinstance(pair, list) and len(pair) == 2 and all(_number(v) for v in pair)):
            raise MalformedDelta(f"{name} not a pair of finite numbers")
    if "embedding" in delta:
        embedding = delta["embedding"]
        if not (isinstance(embedding, dict) and isinstance(embedding.get("num"), list)
                and all(_number(v) for v in embedding["num"]) and _number(embedding.get("den"))):
            raise MalformedDelta("embedding not {num: [numbers], den: number}")
    return delta
