"""Exponential backoff with jitter and a cap, as a pure function."""

from __future__ import annotations

from collections.abc import Callable


def backoff_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    random: Callable[[], float],
) -> float:
    """Return the delay before retry number ``attempt`` (0 for the first retry).

    "Equal jitter": the ceiling doubles with every attempt up to ``cap`` and the delay is drawn
    from its upper half, so delays keep growing (unlike full jitter, which may return ~0 again
    and again) while several clients that lost the same broker still spread out.
    ``random`` returns a float in [0, 1).
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    if base <= 0 or cap < base:
        raise ValueError("need 0 < base <= cap")
    # 2**attempt overflows a float beyond ~1024; the cap is reached long before.
    ceiling = cap if attempt >= 64 else min(cap, base * (2.0**attempt))
    half = ceiling / 2.0
    return half + random() * half
