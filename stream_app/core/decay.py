"""Forward exponential decay (Cormode, Shkapenyuk, Srivastava, Xu: "Forward Decay", ICDE 2009).

An event at time t is stored as w * 2^((t - L) / H) relative to a landmark L. Its decayed weight at any
read time T is then the stored value times 2^((L - T) / H) = w * 2^(-(T - t) / H): the same factor for
every stored sum, so sums can be updated in any order (late events included) and read at any time.
Stored values grow as 2^((t - L) / H); before they can overflow the landmark is moved forward and every
sum is multiplied by the same `rescale_factor`, which callers on both sides of the delta topic share so
that a rebuilt profile is bit-identical to the worker's.
"""

from __future__ import annotations

from typing import Final

# 2^64 ~ 1.8e19: plenty of headroom below float overflow (1.8e308) even for millions of events, and
# far above the 2^-52 rounding of the oldest contributions.
RESCALE_AFTER_HALF_LIVES: Final = 64.0


def forward_weight(ts: float, landmark: float, half_life_s: float) -> float:
    """Stored weight of an event at `ts`: 2^((ts - landmark) / H)."""
    return 2.0 ** ((ts - landmark) / half_life_s)


def age_factor(landmark: float, at: float, half_life_s: float) -> float:
    """Multiply a stored sum by this to read it at time `at`."""
    return 2.0 ** ((landmark - at) / half_life_s)


def rescale_factor(old_landmark: float, new_landmark: float, half_life_s: float) -> float:
    """Multiply every stored sum by this when the landmark moves from old to new."""
    return 2.0 ** ((old_landmark - new_landmark) / half_life_s)


def needs_rescale(newest_ts: float, landmark: float, half_life_s: float) -> bool:
    return (newest_ts - landmark) / half_life_s > RESCALE_AFTER_HALF_LIVES
