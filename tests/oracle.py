"""Brute-force profile definition from docs/semantics.md, for checking the incremental engine against."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from schemas.events import Event
from stream_app.core.keywords import query_terms
from stream_app.core.profile import ProfileParams


def expected_view(
    user_id: str, events: Iterable[Event], params: ProfileParams, at: float | None = None
) -> dict[str, Any]:
    unique: dict[str, Event] = {}
    for event in events:
        unique.setdefault(event.event_id, event)
    chosen = list(unique.values())
    as_of = max(e.ts for e in chosen)
    read_at = as_of if at is None else at

    def d(t: float) -> float:
        return 2.0 ** (-(read_at - t) / params.half_life_s)

    activity: dict[str, float] = {}
    interests: dict[str, float] = {}
    keywords: dict[str, float] = {}
    rating = [0.0, 0.0]
    sentiment = [0.0, 0.0]
    embedding: list[float] | None = None
    embedding_weight = 0.0
    for e in chosen:
        activity[e.type] = activity.get(e.type, 0.0) + d(e.ts)
        if e.category is not None:
            interests[e.category] = interests.get(e.category, 0.0) + params.weights[e.type] * d(e.ts)
        if e.query is not None:
            for term in query_terms(e.query):
                keywords[term] = keywords.get(term, 0.0) + d(e.ts)
        if e.rating is not None:
            rating[0] += e.rating * d(e.ts)
            rating[1] += d(e.ts)
        if e.sentiment is not None:
            sentiment[0] += e.sentiment * d(e.ts)
            sentiment[1] += d(e.ts)
        if e.embedding is not None:
            embedding = [0.0] * len(e.embedding) if embedding is None else embedding
            embedding = [acc + x * d(e.ts) for acc, x in zip(embedding, e.embedding, strict=True)]
            embedding_weight += d(e.ts)
    return {
        "user_id": user_id,
        "as_of": as_of,
        "activity": activity,
        "interests": interests,
        "keywords": keywords,
        "rating": rating[0] / rating[1] if rating[1] else None,
        "sentiment": sentiment[0] / sentiment[1] if sentiment[1] else None,
        # A weight sum of 0: every review is so old that its weight underflows (like the means above).
        "embedding": None if embedding is None or not embedding_weight else [x / embedding_weight for x in embedding],
    }


def assert_close_maps(actual: dict[str, float], expected: dict[str, float], rel: float = 1e-9) -> None:
    assert set(actual) == set(expected), (sorted(actual), sorted(expected))
    for key, value in expected.items():
        assert abs(actual[key] - value) <= rel * max(abs(value), 1e-300), (key, actual[key], value)


def assert_view_matches(
    actual: dict[str, Any], expected: dict[str, Any], rel: float = 1e-9, encoder_abs: float | None = None
) -> None:
    """Profile math to `rel`. Sentiment and embedding come from the encoder; where the expected ones were
    encoded in another batch (other padding, so other float rounding), pass `encoder_abs` to compare them
    to an absolute tolerance instead."""
    assert actual["user_id"] == expected["user_id"]
    assert actual["as_of"] == expected["as_of"]
    for name in ("activity", "interests", "keywords"):
        assert_close_maps(actual[name], expected[name], rel)
    for name in ("rating", "sentiment"):
        if expected[name] is None:
            assert actual[name] is None
        elif name == "sentiment" and encoder_abs is not None:
            assert abs(actual[name] - expected[name]) <= encoder_abs, (name, actual[name], expected[name])
        else:
            assert abs(actual[name] - expected[name]) <= rel * abs(expected[name])
    if expected.get("embedding") is None:
        assert actual.get("embedding") is None
    else:
        assert len(actual["embedding"]) == len(expected["embedding"])
        for got, want in zip(actual["embedding"], expected["embedding"], strict=True):
            tolerance = encoder_abs if encoder_abs is not None else rel * max(abs(want), 1e-12)
            assert abs(got - want) <= tolerance, ("embedding", got, want)
