"""Record-size limits: what keeps every record the engine writes under `PROFILE_MAX_RECORD_BYTES`.

Stock Apache Kafka refuses a record batch over `message.max.bytes` (1,048,588 by default). What grows with a
batch or a user is bounded here, without Kafka: the micro-batch of a user whose delta would not fit a quarter
of the limit (`stream_app.core.fold.fold_in_rounds` measures it) is split into rounds (`split_rounds`), which
leaves the table value room for the profile, the de-duplication ids and the newest delta of its outbox
(`stream_app.core.profile` trims the rest).

Sizes are upper estimates of orjson's output (Faust's table codec is orjson too), never a serialisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from schemas.events import Event
from stream_app.core.keywords import query_terms

# Kafka's per-record framing on top of key, value and headers: aiokafka's estimate for a one-record batch
# is 61 (batch header) + 21 (record overhead) + varint lengths; 128 covers it.
RECORD_OVERHEAD_BYTES: Final = 128
# A delta may use this share of the limit: the table value keeps the newest delta beside the profile.
DELTA_SHARE: Final = 4
_FLOAT: Final = 26  # the longest float orjson writes (24 characters) plus separators
_FIXED: Final = 1024  # key names, version, as_of, landmark, half-life, activity of 4 types, rating, sentiment
PSEUDONYM_BYTES: Final = 66  # a pseudonymised user id (PROFILE_PSEUDONYM_KEY), quoted
_SUM_FIELDS: Final = ("interests", "keywords")


def json_size(value: Any) -> int:
    return len(orjson.dumps(value))


def delta_budget(max_record_bytes: int) -> int:
    return max_record_bytes // DELTA_SHARE


@dataclass
class _DeltaEstimate:
    """An upper bound of one delta's size while events are added to it."""

    user_bytes: int
    max_key: dict[str, int]  # the longest key a drop could name: the profile's and the batch's, so far
    ids_bytes: int = 0
    touched: dict[str, set[str]] = field(default_factory=lambda: {name: set() for name in _SUM_FIELDS})
    touched_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_SUM_FIELDS, 0))
    embedding_bytes: int = 0

    def size_with(self, event: Event) -> tuple[int, dict[str, dict[str, int]], dict[str, int]]:
        """The size with `event` added, and what adding it changes (for `add`)."""
        new_keys: dict[str, dict[str, int]] = {name: {} for name in _SUM_FIELDS}
        for name, key in _keys(event):
            if key not in self.touched[name]:
                new_keys[name][key] = json_size(key)
        max_key = {name: max(self.max_key[name], *new_keys[name].values(), 0) for name in _SUM_FIELDS}
        embedding = self.embedding_bytes
        if event.embedding is not None:
            embedding = max(embedding, 32 + (len(event.embedding) + 1) * _FLOAT)
        total = _FIXED + 2 * self.user_bytes + self.ids_bytes + json_size(event.event_id) + 1 + embedding
        for name in _SUM_FIELDS:
            count = len(self.touched[name]) + len(new_keys[name])
            # Each touched key: its value in the delta; it can also push one other key out (named in `dropped`).
            total += (self.touched_bytes[name] + sum(new_keys[name].values()) + count * (1 + _FLOAT)
                      + count * (max_key[name] + 1))
        return total, new_keys, max_key

    def add(self, event: Event, new_keys: dict[str, dict[str, int]], max_key: dict[str, int]) -> None:
        self.ids_bytes += json_size(event.event_id) + 1
        for name in _SUM_FIELDS:
            self.touched[name].update(new_keys[name])
            self.touched_bytes[name] += sum(new_keys[name].values())
        self.max_key = max_key
        if event.embedding is not None:
            self.embedding_bytes = max(self.embedding_bytes, 32 + (len(event.embedding) + 1) * _FLOAT)


def _keys(event: Event) -> list[tuple[str, str]]:
    keys = [] if event.category is None else [("interests", event.category)]
    if event.query is not None:
        keys.extend(("keywords", term) for term in query_terms(event.query))
    return keys


def _loose_size(user_bytes: int, events: Sequence[Event], stored: dict[str, Any] | None) -> int:
    """An upper bound of `_DeltaEstimate`'s size for all of `events` in one piece, without serialising: each
    term of the estimate with every string's JSON length replaced by 6 * its length + 2, at least orjson's
    length for any string (2 quotes, at most 6 bytes per character: a \\uXXXX escape; UTF-8 takes at most 4).
    The estimate only grows as events are added, so no prefix exceeds it either."""
    total = _FIXED + 2 * user_bytes
    embedding = 0
    interests: set[str] = set()
    keywords: set[str] = set()
    for event in events:
        total += 6 * len(event.event_id) + 3
        if event.embedding is not None:
            embedding = max(embedding, 32 + (len(event.embedding) + 1) * _FLOAT)
        if event.category is not None:
            interests.add(event.category)
        if event.query is not None:
            keywords.update(query_terms(event.query))
    total += embedding
    for name, keys in (("interests", interests), ("keywords", keywords)):
        if not keys:
            continue
        known = (stored or {}).get(name) or {}
        longest = max(max(map(len, known), default=0), max(map(len, keys)))
        count = len(keys)
        total += 6 * sum(map(len, keys)) + 2 * count + count * (1 + _FLOAT) + count * (6 * longest + 2 + 1)
    return total


def user_chunks(user_id: str, events: Sequence[Event], stored: dict[str, Any] | None, budget: int) -> list[list[Event]]:
    """One user's events, in order, cut so that the delta of each piece stays within `budget` bytes.

    An event that alone exceeds the budget is a piece of its own (its delta is still far under the record
    limit: every field of an event is bounded by the input contract).
    """
    user_bytes = max(json_size(user_id), PSEUDONYM_BYTES)
    if _loose_size(user_bytes, events, stored) <= budget:
        return [list(events)]  # ~5x cheaper than the exact estimate below
    return _exact_chunks(user_bytes, events, stored, budget)


def _exact_chunks(user_bytes: int, events: Sequence[Event], stored: dict[str, Any] | None,
                  budget: int) -> list[list[Event]]:
    estimate = _DeltaEstimate(user_bytes, {
        name: max((json_size(k) for k in (stored or {}).get(name) or {}), default=0) for name in _SUM_FIELDS})
    chunks: list[list[Event]] = [[]]
    for event in events:
        size, new_keys, max_key = estimate.size_with(event)
        if size > budget and chunks[-1]:
            chunks.append([])
            estimate = _DeltaEstimate(user_bytes, estimate.max_key)
            size, new_keys, max_key = estimate.size_with(event)
        estimate.add(event, new_keys, max_key)
        chunks[-1].append(event)
    return chunks


def split_rounds(
    events: Sequence[Event], stored: Callable[[str], dict[str, Any] | None], max_record_bytes: int
) -> list[list[Event]]:
    """A micro-batch as rounds to fold one after the other: round i holds piece i of every user's events.

    Folding each round gives each user at most one delta per round, within `delta_budget`: a user with a big
    batch (a bot, a backlog) gets several consecutive versions instead of one oversized delta. The worker calls
    this only for the users whose delta, folded whole, did not fit (`stream_app.core.fold.fold_in_rounds`).
    """
    budget = delta_budget(max_record_bytes)
    by_user: dict[str, list[Event]] = {}
    for event in events:
        by_user.setdefault(event.user_id, []).append(event)
    rounds: list[list[Event]] = []
    for user_id, user_events in by_user.items():
        for index, chunk in enumerate(user_chunks(user_id, user_events, stored(user_id), budget)):
            if index == len(rounds):
                rounds.append([])
            rounds[index].extend(chunk)
    return rounds
