"""The profile agent's work on one micro-batch, without Kafka: bundles in, table values and deltas out.

Bundles are what the ingest and review agents write to the by-user topic: one JSON array of validated
events per target partition per micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from schemas.events import Event, event_from_trusted_doc
from stream_app.core.limits import PSEUDONYM_BYTES, delta_budget, json_size, split_rounds
from stream_app.core.profile import (
    ApplyResult,
    Delta,
    IncompatibleProfile,
    ProfileParams,
    ProfileState,
    ProfileTooLarge,
    apply,
)


def encode_bundle(events: Sequence[Event]) -> bytes:
    return b"[" + b",".join(event.to_json() for event in events) + b"]"


def decode_bundle(value: bytes | None) -> list[Event]:
    """Events of one by-user bundle (raises on a value that is not one: the agent dead-letters it)."""
    return [event_from_trusted_doc(doc) for doc in orjson.loads(value)] if value else []


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


@dataclass(frozen=True, slots=True)
class FoldFailure:
    """One user's events of a batch that could not be folded: none of them counted, the profile is unchanged."""

    user_id: str
    events: list[Event]
    reason: str


@dataclass
class FoldedBatch:
    """What one micro-batch changes: table values to write, deltas to publish (re-emissions flagged), and
    the users whose events could not be folded (to dead-letter)."""

    writes: dict[str, dict[str, Any]] = field(default_factory=dict)
    encoded: dict[str, bytes] = field(default_factory=dict)  # the writes as JSON, where `apply` had them
    deltas: list[tuple[Delta, bool]] = field(default_factory=list)
    failures: list[FoldFailure] = field(default_factory=list)
    events: int = 0
    duplicates: int = 0
    # Users whose delta would not fit the budget `fold_batch` was given: nothing of theirs is recorded above.
    oversize: list[str] = field(default_factory=list)
    # Users folded without failure: once this round's deltas are confirmed, none of theirs is unsent.
    users: list[str] = field(default_factory=list)

    def merge(self, other: FoldedBatch) -> None:
        """Add a fold of other users' events (the same round: each user at most once)."""
        self.writes.update(other.writes)
        self.encoded.update(other.encoded)
        self.deltas.extend(other.deltas)
        self.failures.extend(other.failures)
        self.events += other.events
        self.duplicates += other.duplicates
        self.oversize.extend(other.oversize)
        self.users.extend(other.users)


def unsent_after_recovery(stored: dict[str, Any] | None) -> Delta | None:
    """The delta a recovered state may hold unsent: its outbox's newest.

    A fold writes the new states, then sends their deltas and waits for the broker to store them before the next
    fold starts (one lock for every agent: `stream_app.worker.folding`). So a crash can leave one delta per user
    unsent, the newest, and older outbox deltas were confirmed. A worker that recovers a state from the changelog
    cannot tell whether that newest delta went out, so it sends it again (subscribers skip versions they have)."""
    outbox = stored.get("outbox") if stored is not None else None
    return outbox[-1] if outbox else None


def fold_batch(
    events: Sequence[Event], stored: Callable[[str], dict[str, Any] | None], params: ProfileParams,
    budget: int | None = None, unsettled: Container[str] = frozenset(),
) -> FoldedBatch:
    """Fold each user's events; a user whose fold raises is reported in `failures` and the rest go on.

    A fold that raises changes nothing: `ProfileState.from_dict` works on copies, and no write or delta of
    that user is recorded. The reason names the exception type and message; events carry no review text
    by now (the review agent drops it), so the message cannot leak it. `IncompatibleProfile` (a profile
    built under other settings) is raised, not reported: it is no fault of the events.

    With a `budget` (bytes), a user whose delta would not fit it, or whose profile could not hold that delta,
    is listed in `oversize` instead, with nothing recorded: `fold_in_rounds` folds those again in pieces.

    `unsettled`: users whose stored state was recovered from the changelog and not folded since. Their outbox's
    newest delta may never have been sent (`unsent_after_recovery`), so it goes out again before anything newer,
    whichever of the user's events comes first: a redelivered one or a fresh one from the other input stream.
    """
    folded = FoldedBatch(events=len(events))
    for user_id, user_events in group_by_user(events).items():
        before = stored(user_id)
        try:
            new_value, result = update_profile(before, user_id, user_events, params)
            oversize = budget is not None and result.delta is not None and _over_budget(result, budget)
        except IncompatibleProfile:
            raise  # the settings, not the events, are wrong: dead-lettering would drop every event of the user
        except ProfileTooLarge as exc:
            if budget is None:
                folded.failures.append(FoldFailure(user_id, list(user_events), _failure_reason(exc)))
                continue
            oversize = True  # the batch's delta did not fit beside the profile: in pieces it may
        except Exception as exc:  # one user's poison must not stop the partition; each failure is dead-lettered
            folded.failures.append(FoldFailure(user_id, list(user_events), _failure_reason(exc)))
            continue
        if oversize:
            folded.oversize.append(user_id)
            folded.events -= len(user_events)
            continue
        if new_value is not None:
            folded.writes[user_id] = new_value
            if result.encoded is not None:
                folded.encoded[user_id] = result.encoded
        counted = len(result.delta["event_ids"]) if result.delta is not None else 0
        folded.duplicates += len(user_events) - counted
        folded.users.append(user_id)
        again = result.redeliveries
        unsent = unsent_after_recovery(before) if user_id in unsettled else None
        if unsent is not None and all(delta["version"] != unsent["version"] for delta in again):
            again = sorted([*again, unsent], key=lambda delta: delta["version"])
        # Re-emissions first: their versions are older than the new delta's.
        folded.deltas.extend((delta, True) for delta in again)
        if result.delta is not None:
            folded.deltas.append((result.delta, False))
    return folded


def _failure_reason(exc: Exception) -> str:
    return f"profile update failed: {type(exc).__name__}: {exc}"[:500]


def _over_budget(result: ApplyResult, budget: int) -> bool:
    """Whether the delta, sent under a pseudonym as long as any (PROFILE_PSEUDONYM_KEY), could exceed
    `budget` bytes. The new state's JSON, serialised by the fold anyway, holds this delta in its outbox, so its
    length bounds the delta's: the delta itself is serialised only when the whole state is over the budget."""
    slack = PSEUDONYM_BYTES
    if result.encoded is not None and len(result.encoded) + slack <= budget:
        return False
    return json_size(result.delta) + slack > budget


def fold_in_rounds(
    events: Sequence[Event], stored: Callable[[str], dict[str, Any] | None], params: ProfileParams,
    unsettled: Container[str] = frozenset(),
) -> Iterator[FoldedBatch]:
    """A micro-batch folded in rounds, each user at most once per round, every delta within
    `delta_budget(params.max_record_bytes)` (the table value keeps room for the profile beside its newest delta).

    Nearly always one round: every user's events are folded at once and each delta's real size checked. A
    user whose delta would not fit (a bot, a long backlog) is folded again from the stored state, the events
    cut into pieces by `split_rounds`' size estimate, one piece per round: several consecutive versions instead
    of one oversized delta. The caller stores each round's writes before it asks for the next round: the next
    one reads them back through `stored`. `unsettled` is read at each round (see `fold_batch`): the caller takes
    a round's `users` out of it once that round's deltas are confirmed.
    """
    budget = delta_budget(params.max_record_bytes)
    first = fold_batch(events, stored, params, budget, unsettled)
    if not first.oversize:
        yield first
        return
    oversize = set(first.oversize)
    first.oversize = []
    rounds = split_rounds([e for e in events if e.user_id in oversize], stored, params.max_record_bytes)
    first.merge(fold_batch(rounds[0], stored, params, unsettled=unsettled))
    yield first
    for round_events in rounds[1:]:
        yield fold_batch(round_events, stored, params, unsettled=unsettled)
