"""The profile agent's work on one micro-batch, without Kafka: bundles in, table values and deltas out.

Bundles are what the ingest and review agents write to the by-user topic: one JSON array of validated
events per target partition per micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from schemas.events import Event, event_from_trusted_doc
from stream_app.core.profile import ApplyResult, Delta, ProfileParams, ProfileState, apply


def encode_bundle(events: Sequence[Event]) -> bytes:
    return b"[" + b",".join(event.to_json() for event in events) + b"]"


def decode_bundles(values: Sequence[bytes | None]) -> list[Event]:
    """Events of a micro-batch of by-user bundles, in order."""
    return [event_from_trusted_doc(doc) for value in values if value for doc in orjson.loads(value)]


def group_by_user(events: Sequence[Event]) -> dict[str, list[Event]]:
    groups: dict[str, list[Event]] = {}
    for event in events:
        groups.setdefault(event.user_id, []).append(event)
    return groups


def update_profile(
    stored: dict[str, Any] | None, user_id: str, events: Sequence[Event], params: ProfileParams
) -> tuple[dict[str, Any] | None, ApplyResult]:
    """The new table value (None: unchanged) and what to publish."""
    state = ProfileState.from_dict(stored) if stored is not None else ProfileState(user_id)
    result = apply(state, events, params)
    return (None if result.delta is None else state.to_dict()), result


@dataclass
class FoldedBatch:
    """What one micro-batch changes: table values to write, deltas to publish (re-emissions flagged)."""

    writes: dict[str, dict[str, Any]] = field(default_factory=dict)
    deltas: list[tuple[Delta, bool]] = field(default_factory=list)
    events: int = 0
    duplicates: int = 0


def fold_batch(
    events: Sequence[Event], stored: Callable[[str], dict[str, Any] | None], params: ProfileParams
) -> FoldedBatch:
    folded = FoldedBatch(events=len(events))
    for user_id, user_events in group_by_user(events).items():
        new_value, result = update_profile(stored(user_id), user_id, user_events, params)
        if new_value is not None:
            folded.writes[user_id] = new_value
        counted = len(result.delta["event_ids"]) if result.delta is not None else 0
        folded.duplicates += len(user_events) - counted
        # Re-emissions first: their versions are older than the new delta's.
        folded.deltas.extend((delta, True) for delta in result.redeliveries)
        if result.delta is not None:
            folded.deltas.append((result.delta, False))
    return folded
