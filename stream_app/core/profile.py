"""Per-user profile state and the pure update `apply(profile, events) -> delta`.

No Kafka, no clock: everything here is a function of the profile and the events (their event time), so
a replay of the same events gives the same profile, whatever order they arrive in.

The state keeps forward-decayed sums (see `stream_app.core.decay`) relative to a per-user landmark. A delta
carries the new absolute stored values of exactly the keys a micro-batch changed, the landmark, the
half-life and `as_of`; `stream_app.core.replica.apply_delta` applies it to a replica.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from schemas.events import EVENT_TYPES, Event
from stream_app.core.decay import age_factor, check_read_time, forward_weight, needs_rescale, rescale_factor
from stream_app.core.keywords import query_terms
from stream_app.core.limits import RECORD_OVERHEAD_BYTES, json_size

Delta = dict[str, Any]
MEAN_FIELDS: Final = ("rating", "sentiment")


class IncompatibleProfile(ValueError):
    """A stored profile was built under other settings (half-life) or another encoder (embedding size).

    Not a problem of the events at hand, so not dead-lettered: every later event of the user would meet the
    same profile. The profile agent stops the worker with this reason instead (docs/crash-safety.md).
    """


@dataclass(frozen=True, slots=True)
class ProfileParams:
    half_life_s: float
    weights: dict[str, float]
    top_k: int = 50
    dedup_window: int = 512
    # Only the newest delta can be unsent after a crash (`stream_app.core.fold.unsent_after_recovery`); older ones
    # were confirmed, and each kept copy of a review user's 384 embedding sums cost ~13 KiB of memory.
    redelivery_window: int = 1
    max_record_bytes: int = 1_000_000

    @classmethod
    def from_settings(cls, settings: Any) -> ProfileParams:
        return cls(
            half_life_s=settings.half_life_s,
            weights={t: settings.weight_for(t) for t in EVENT_TYPES},
            top_k=settings.top_k,
            dedup_window=settings.dedup_window,
            redelivery_window=settings.redelivery_window,
            max_record_bytes=settings.max_record_bytes,
        )


@dataclass(slots=True)
class ProfileState:
    """Decayed sums of one user, as stored in the table and as rebuilt by subscribers."""

    user_id: str
    version: int = 0
    landmark: float | None = None
    as_of: float | None = None
    half_life_s: float | None = None
    activity: dict[str, float] = field(default_factory=dict)
    interests: dict[str, float] = field(default_factory=dict)
    keywords: dict[str, float] = field(default_factory=dict)
    # Decayed means are kept as [Σ value·g, Σ g]; the decay factor cancels in the ratio.
    rating: list[float] = field(default_factory=lambda: [0.0, 0.0])
    sentiment: list[float] = field(default_factory=lambda: [0.0, 0.0])
    embedding_num: list[float] | None = None
    embedding_den: float = 0.0
    # Worker-only bookkeeping for effectively-once processing (never part of a delta).
    seen: dict[str, int] = field(default_factory=dict)  # event_id -> version that counted it
    outbox: list[Delta] = field(default_factory=list)  # the last deltas, for re-emission after a crash

    # -- (de)serialisation for the table's changelog -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id, "version": self.version, "landmark": self.landmark,
            "as_of": self.as_of, "half_life_s": self.half_life_s, "activity": self.activity,
            "interests": self.interests, "keywords": self.keywords, "rating": self.rating,
            "sentiment": self.sentiment, "embedding_num": self.embedding_num,
            "embedding_den": self.embedding_den, "seen": self.seen, "outbox": self.outbox,
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ProfileState:
        """A state of its own: `apply` changes containers in place, and if it raises half-way the caller's
        document (the table's in-memory value) must still be the stored one."""
        state = cls(**doc)
        for name in ("activity", "interests", "keywords", "seen"):
            setattr(state, name, dict(getattr(state, name)))
        for name in ("rating", "sentiment", "outbox"):
            setattr(state, name, list(getattr(state, name)))
        return state

    # -- reading -----------------------------------------------------------------------------------
    def view(self, at: float | None = None) -> dict[str, Any]:
        """The profile as users see it: every decayed value read at `at` (default: `as_of`).

        `at` must be a finite time in the accepted event-time range (ValueError otherwise). A profile holds
        no history, only sums, so it can be aged forward but not back: a read time before `as_of` reads at
        `as_of`. (Extrapolating back would weigh later events 2^((t - at)/H) > 1, which overflows for reads
        ~1000 half-lives early and means nothing before that.) Every value is then a stored sum times a
        factor of at most 1: finite.
        """
        read_at = self.as_of
        if at is not None:
            check_read_time(at)
            read_at = at if self.as_of is None else max(at, self.as_of)
        if self.landmark is None or read_at is None or self.half_life_s is None:
            factor = 0.0
        else:
            factor = age_factor(self.landmark, read_at, self.half_life_s)
        return {
            "user_id": self.user_id,
            "version": self.version,
            "as_of": self.as_of,
            "activity": {k: v * factor for k, v in sorted(self.activity.items())},
            "interests": _ranked(self.interests, factor),
            "keywords": _ranked(self.keywords, factor),
            "rating": _mean(self.rating),
            "sentiment": _mean(self.sentiment),
            "embedding": (
                None if self.embedding_num is None or self.embedding_den <= 0
                else [x / self.embedding_den for x in self.embedding_num]
            ),
        }


def _ranked(values: dict[str, float], factor: float) -> dict[str, float]:
    return {k: v * factor for k, v in sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))}


def _mean(num_den: Sequence[float]) -> float | None:
    return num_den[0] / num_den[1] if num_den[1] > 0 else None


@dataclass(slots=True)
class ApplyResult:
    delta: Delta | None  # None when every event was a duplicate
    redeliveries: list[Delta]  # earlier deltas whose events were delivered again
    # The new state as JSON (orjson, what the table's codec writes), when there is a delta: measured for the
    # record limit anyway, so the table write sends these bytes instead of serialising the state again.
    encoded: bytes | None = None


def apply(profile: ProfileState, events: Sequence[Event], params: ProfileParams) -> ApplyResult:
    """Fold a micro-batch of one user's events into `profile` (in place) and describe the change.

    Duplicates (event ids the profile has already counted) are not counted again; if the delta that
    counted one is still in the outbox it is returned for re-emission, since a crash may have lost it.
    """
    fresh: list[Event] = []
    redeliver_versions: set[int] = set()
    batch_ids: set[str] = set()
    for event in events:
        if event.user_id != profile.user_id:
            raise ValueError(f"event for {event.user_id!r} applied to profile of {profile.user_id!r}")
        counted_in = profile.seen.get(event.event_id)
        if counted_in is not None:
            redeliver_versions.add(counted_in)
        elif event.event_id not in batch_ids:
            batch_ids.add(event.event_id)
            fresh.append(event)
    redeliveries = [d for d in profile.outbox if d["version"] in redeliver_versions]
    if not fresh:
        return ApplyResult(None, redeliveries)

    half_life = params.half_life_s
    check_compatible(profile, params, fresh)
    if profile.half_life_s is None:
        profile.half_life_s = half_life
    newest = max(e.ts for e in fresh)
    # One landmark for the whole batch, chosen before any weight is added: within RESCALE_AFTER_HALF_LIVES
    # of its newest event, so no stored weight exceeds 2^64 whatever the span of the batch (a first batch
    # with events 1970 and 2024 would otherwise need 2^2800). One move per batch also keeps replicas
    # bit-identical: `apply_delta` scales untouched sums by the same single factor.
    if profile.landmark is None:
        oldest = min(e.ts for e in fresh)
        profile.landmark = newest if needs_rescale(newest, oldest, half_life) else oldest
    elif needs_rescale(newest, profile.landmark, half_life):
        _rescale(profile, newest)
    landmark = profile.landmark

    touched: dict[str, set[str]] = {"activity": set(), "interests": set(), "keywords": set()}
    touched_means: set[str] = set()
    touched_embedding = False
    for event in fresh:
        g = forward_weight(event.ts, landmark, half_life)
        kind = event.type
        profile.activity[kind] = profile.activity.get(kind, 0.0) + g
        touched["activity"].add(kind)
        if event.category is not None:
            profile.interests[event.category] = profile.interests.get(event.category, 0.0) + params.weights[kind] * g
            touched["interests"].add(event.category)
        if event.query is not None:
            for term in query_terms(event.query):
                profile.keywords[term] = profile.keywords.get(term, 0.0) + g
                touched["keywords"].add(term)
        if event.rating is not None:
            _add_mean(profile.rating, float(event.rating), g)
            touched_means.add("rating")
        if event.sentiment is not None:
            _add_mean(profile.sentiment, event.sentiment, g)
            touched_means.add("sentiment")
        if event.embedding is not None:
            _add_embedding(profile, event.embedding, g)
            touched_embedding = True

    dropped = {name: _prune(getattr(profile, name), params.top_k) for name in ("interests", "keywords")}
    profile.as_of = newest if profile.as_of is None else max(profile.as_of, newest)
    profile.version += 1

    delta: Delta = {
        "user_id": profile.user_id,
        "version": profile.version,
        "event_ids": [e.event_id for e in fresh],
        "as_of": profile.as_of,
        "landmark": landmark,
        "half_life_s": half_life,
    }
    for name, keys in touched.items():
        values = getattr(profile, name)
        changed = {k: values[k] for k in keys if k in values}
        if changed:
            delta[name] = changed
    drops = {name: keys for name, keys in dropped.items() if keys}
    if drops:
        delta["dropped"] = drops
    for name in touched_means:
        delta[name] = list(getattr(profile, name))
    if touched_embedding:
        delta["embedding"] = {"num": list(profile.embedding_num or ()), "den": profile.embedding_den}

    for event in fresh:
        profile.seen[event.event_id] = profile.version
    _trim_oldest(profile.seen, params.dedup_window)
    profile.outbox.append(delta)
    del profile.outbox[: max(0, len(profile.outbox) - params.redelivery_window)]
    encoded = bound_record(profile, params.max_record_bytes)
    return ApplyResult(delta, redeliveries, encoded)


def check_compatible(profile: ProfileState, params: ProfileParams, events: Sequence[Event] = ()) -> None:
    """Raise `IncompatibleProfile` if `profile` cannot take events under these settings (before any change)."""
    if profile.half_life_s is not None and profile.half_life_s != params.half_life_s:
        raise IncompatibleProfile(
            f"profile {profile.user_id!r} was built with half-life {profile.half_life_s} s, "
            f"settings say {params.half_life_s} s; replay into a new app id to change it"
        )
    if profile.embedding_num is not None:
        size = len(profile.embedding_num)
        for event in events:
            if event.embedding is not None and len(event.embedding) != size:
                raise IncompatibleProfile(
                    f"profile {profile.user_id!r} holds {size}-dimensional embeddings, the encoder now gives "
                    f"{len(event.embedding)}; replay into a new app id to change the encoder"
                )


def apply_one(profile: ProfileState, event: Event, params: ProfileParams) -> Delta | None:
    """`apply` for a single event: the delta it caused, or None for a duplicate."""
    return apply(profile, [event], params).delta


def _rescale(profile: ProfileState, new_landmark: float) -> None:
    if profile.landmark is None or profile.half_life_s is None:
        raise ValueError("cannot rescale a profile that has no landmark yet")
    factor = rescale_factor(profile.landmark, new_landmark, profile.half_life_s)
    scale_sums(profile, factor)
    profile.landmark = new_landmark


def scale_sums(profile: ProfileState, factor: float) -> None:
    """Multiply every stored decayed sum by `factor` (a landmark move). Means' ratios are unchanged."""
    for values in (profile.activity, profile.interests, profile.keywords):
        for key in values:
            values[key] *= factor
    for pair in (profile.rating, profile.sentiment):
        pair[0] *= factor
        pair[1] *= factor
    if profile.embedding_num is not None:
        profile.embedding_num = [x * factor for x in profile.embedding_num]
    profile.embedding_den *= factor


def _add_mean(pair: list[float], value: float, g: float) -> None:
    pair[0] += value * g
    pair[1] += g


def _add_embedding(profile: ProfileState, embedding: Iterable[float], g: float) -> None:
    vector = list(embedding)
    if profile.embedding_num is None:
        profile.embedding_num = [x * g for x in vector]
    else:
        if len(vector) != len(profile.embedding_num):
            raise ValueError(f"embedding has {len(vector)} dimensions, profile has {len(profile.embedding_num)}")
        profile.embedding_num = [a + x * g for a, x in zip(profile.embedding_num, vector, strict=True)]
    profile.embedding_den += g


def _prune(values: dict[str, float], top_k: int) -> list[str]:
    """Keep the top_k largest (ties by key, so the result does not depend on insertion order)."""
    if len(values) <= top_k:
        return []
    keep = heapq.nsmallest(top_k, values.items(), key=lambda kv: (-kv[1], kv[0]))
    kept = {k for k, _ in keep}
    dropped = sorted(k for k in values if k not in kept)
    for key in dropped:
        del values[key]
    return dropped


class ProfileTooLarge(ValueError):
    pass


def bound_record(profile: ProfileState, max_record_bytes: int) -> bytes:
    """Keep the table value (key + JSON state) within one Kafka record of `max_record_bytes`; returns the
    state's JSON (serialised once when it fits, as nearly always, and once more after trimming).

    The oldest outbox deltas go first, never the newest: the agent confirms a round's deltas before it
    writes the next round, so only the newest delta can be lost by a crash and need re-emission. Then the
    oldest de-duplication ids go, never those of the newest version (a redelivered event must find the
    version that counted it). A profile that still does not fit (only possible with a limit far below the
    default and keys near the contract's length limits) raises instead of writing a record Kafka refuses.
    """
    budget = max_record_bytes - RECORD_OVERHEAD_BYTES - len(profile.user_id.encode())
    encoded = orjson.dumps(profile.to_dict())
    size = len(encoded)
    if size <= budget:
        return encoded
    while size > budget and len(profile.outbox) > 1:
        size -= json_size(profile.outbox.pop(0)) + 1
    if size > budget:
        for event_id, version in list(profile.seen.items()):
            if size <= budget:
                break
            if version != profile.version:
                del profile.seen[event_id]
                size -= json_size(event_id) + len(str(version)) + 2
    if size > budget:
        raise ProfileTooLarge(
            f"profile {profile.user_id[:64]!r} needs {size} bytes, over PROFILE_MAX_RECORD_BYTES="
            f"{max_record_bytes} even with its outbox and de-duplication ids trimmed; raise the limit or lower "
            "PROFILE_TOP_K"
        )
    return orjson.dumps(profile.to_dict())


def _trim_oldest(seen: dict[str, int], limit: int) -> None:
    excess = len(seen) - limit
    if excess > 0:
        for key in list(seen)[:excess]:
            del seen[key]
