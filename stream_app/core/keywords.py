"""Search-query terms: lower-cased word tokens, English stop words dropped, no stemming."""

from __future__ import annotations

import re
from typing import Final

_WORD: Final = re.compile(r"[^\W_]+")

# The classic Glasgow/sklearn-style core list, trimmed to function words: content words such as
# "top", "back" or "side" carry product intent in shopping queries and are kept.
STOP_WORDS: Final = frozenset(
    """
    a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just me more most
    my myself no nor not now of off on once only or other our ours ourselves out over own same she should
    so some such than that the their theirs them themselves then there these they this those through to
    too under until up very was we were what when where which while who whom why will with would you
    your yours yourself yourselves s t d m ll re ve don
    """.split()
)


def query_terms(query: str) -> list[str]:
    """Distinct terms of a query, in first-seen order (a term counts once per query)."""
    seen: dict[str, None] = {}
    for token in _WORD.findall(query.lower()):
        if token not in STOP_WORDS:
            seen.setdefault(token, None)
    return list(seen)
