"""Forward exponential decay (Cormode, Shkapenyuk, Srivastava, Xu: "Forward Decay", ICDE 2009).

An event at time t is stored as w * 2^((t - L) / H) relative to a landmark L. Its decayed weight at any
read time T is then the stored value times 2^((L - T) / H) = w * 2^(-(T - t) / H): the same factor for
every stored sum, so sums can be updated in any order (late events included) and read at any time.
Stored values grow as 2^((t - L) / H); before they can overflow the landmark is moved forward and every
sum is multiplied by the same `rescale_factor`, which callers on both sides of the delta topic share so
that a rebuilt profile is bit-identical to the worker's.

Range: every timestamp the contract accepts (1970..2200) may meet every other, whatever the half-life.
No exponent given to `2.0 **` here is ever above `MAX_EXPONENT` (callers keep the landmark within
`RESCALE_AFTER_HALF_LIVES` of the newest event, so stored weights are at most 2^64), and an exponent below
`-UNDERFLOW_HALF_LIVES` gives exactly 0: an event that much older than the landmark no longer counts.
Its weight next to the landmark's own events would be under 2^-1000 ~ 1e-301, far below the 2^-52
rounding of any sum those events are in, so dropping it changes no sum that anything else contributes to.
"""

from __future__ import annotations

import math
from typing import Final

from schemas.events import MAX_TS, MIN_TS

# 2^64 ~ 1.8e19: plenty of headroom below float overflow (1.8e308) even for millions of events, and
# far above the 2^-52 rounding of the oldest contributions.
RESCALE_AFTER_HALF_LIVES: Final = 64.0
# Below 2^-1000 a weight is 0: no subnormal numbers (which lose precision) and no 2.0 ** x underflow
# surprises; 1000 is well inside float range (2^-1022 is the smallest normal number).
UNDERFLOW_HALF_LIVES: Final = 1000.0
# The largest exponent a caller may ask for. Nothing in the engine comes near it (stored weights stay
# within 2^64, read factors within 2^0); it is a guard so that a logic error raises instead of storing inf.
MAX_EXPONENT: Final = 1000.0


def pow2(exponent: float) -> float:
    """2^exponent, exactly 0 below -UNDERFLOW_HALF_LIVES; ValueError above MAX_EXPONENT or for NaN."""
    if not exponent <= MAX_EXPONENT:  # also NaN
        raise ValueError(f"decay exponent {exponent!r} is out of range; this is a bug in the engine")
    if exponent < -UNDERFLOW_HALF_LIVES:
        return 0.0
    return 2.0 ** exponent


def forward_weight(ts: float, landmark: float, half_life_s: float) -> float:
    """Stored weight of an event at `ts`: 2^((ts - landmark) / H), 0 when far older than the landmark."""
    return pow2((ts - landmark) / half_life_s)


def age_factor(landmark: float, at: float, half_life_s: float) -> float:
    """Multiply a stored sum by this to read it at time `at` (callers read at or after the landmark)."""
    return pow2((landmark - at) / half_life_s)


def rescale_factor(old_landmark: float, new_landmark: float, half_life_s: float) -> float:
    """Multiply every stored sum by this when the landmark moves from old to new (always forward)."""
    return pow2((old_landmark - new_landmark) / half_life_s)


def needs_rescale(newest_ts: float, landmark: float, half_life_s: float) -> bool:
    return (newest_ts - landmark) / half_life_s > RESCALE_AFTER_HALF_LIVES


def check_read_time(at: float) -> float:
    """A read time (`view(at)`, `?at=`, `--at`) must be a finite instant in the accepted event-time range."""
    if not math.isfinite(at):
        raise ValueError(f"read time {at!r} is not a finite epoch time in seconds")
    if not MIN_TS <= at < MAX_TS:
        raise ValueError(f"read time {at!r} is outside 1970-01-01..2200-01-01 (epoch seconds {MIN_TS:.0f}.."
                         f"{MAX_TS:.0f}), the range event times are accepted in")
    return at
