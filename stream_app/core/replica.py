"""The delta replica: rebuild profiles from the deltas of the `profile-deltas` topic.

Applying every delta of a user in order to an empty `ProfileState` gives exactly the worker's table
state (the same floating-point operations in the same order), so `view(at)` matches the worker's.

Deltas may be delivered more than once (re-emitted after a crash): a delta whose version is not newer
than the replica's is skipped. A version jump (a lost delta) is applied anyway and recorded in `gaps`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from stream_app.core.decay import rescale_factor
from stream_app.core.profile import MEAN_FIELDS, Delta, ProfileState, scale_sums

SUM_FIELDS = ("activity", "interests", "keywords")


def apply_delta(state: ProfileState, delta: Delta) -> bool:
    """Apply one delta to a replica. False when it is a duplicate (not newer than the replica)."""
    if delta["version"] <= state.version:
        return False
    landmark = delta["landmark"]
    if state.landmark is not None and landmark != state.landmark:
        scale_sums(state, rescale_factor(state.landmark, landmark, delta["half_life_s"]))
    state.landmark = landmark
    state.half_life_s = delta["half_life_s"]
    state.as_of = delta["as_of"]
    state.version = delta["version"]
    for name in SUM_FIELDS:
        changed = delta.get(name)
        if changed:
            getattr(state, name).update(changed)
    for name, keys in delta.get("dropped", {}).items():
        values = getattr(state, name)
        for key in keys:
            values.pop(key, None)
    for name in MEAN_FIELDS:
        if name in delta:
            setattr(state, name, list(delta[name]))
    if "embedding" in delta:
        state.embedding_num = list(delta["embedding"]["num"])
        state.embedding_den = delta["embedding"]["den"]
    return True


@dataclass
class ProfileReplicas:
    """All users' profiles rebuilt from a delta stream."""

    profiles: dict[str, ProfileState] = field(default_factory=dict)
    gaps: list[tuple[str, int, int]] = field(default_factory=list)  # (user, expected version, got)
    duplicates: int = 0

    def apply(self, delta: Delta) -> bool:
        user_id = delta["user_id"]
        state = self.profiles.get(user_id)
        if state is None:
            state = self.profiles[user_id] = ProfileState(user_id)
        if delta["version"] > state.version + 1:
            self.gaps.append((user_id, state.version + 1, delta["version"]))
        applied = apply_delta(state, delta)
        if not applied:
            self.duplicates += 1
        return applied

    def apply_all(self, deltas: Iterable[Delta]) -> ProfileReplicas:
        for delta in deltas:
            self.apply(delta)
        return self

    def views(self, at: float | None = None) -> Iterator[dict[str, Any]]:
        for user_id in sorted(self.profiles):
            yield self.profiles[user_id].view(at)
