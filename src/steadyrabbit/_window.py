"""The adaptive prefetch window: how many messages the broker may send ahead, from the measured
handler durations. Pure logic; the consumer applies what it decides.

No message may wait unstarted in the client for long: that wait counts toward the broker's
``consumer_timeout`` (the seed incident). But the rule is about time, not a count: a 50 µs
handler can have hundreds of messages waiting a few milliseconds each, a 70 s handler none.
With ``concurrency`` handlers busy, the k-th waiting message starts after about
``k x duration / concurrency``; the window lets ``budget / 2 x concurrency / duration`` of them
wait, so the last one waits about half the budget. The consumer returns any message that waited
the whole budget unstarted (its aged-prefetch return): that is how a window shrinks at once.
The duration used is the larger of an average (EWMA) and a high estimate that jumps up at once
and decays slowly, so a slowdown shrinks the window at the first slow run, and a speed-up grows
it only as the evidence builds.

Growth needs the target to be 25 % above the window, shrinking 20 % below (hysteresis: a
window near a boundary does not flap); ``cap`` bounds it. Before any run it is the concurrency,
as without adaptation: nothing waits until durations are known.
"""

from __future__ import annotations

import math

#: The most messages a consumer lets the broker send ahead, whatever the durations.
WINDOW_CAP = 1000
#: How long a message may wait unstarted: at most this, and at most a small share of the
#: broker's consumer_timeout.
MAX_BUDGET = 1.0
BUDGET_SHARE = 0.05

_AVERAGE_WEIGHT = 0.1  # of the newest duration in the EWMA
_HIGH_DECAY = 0.995  # per run: a high estimate halves in about 140 runs
_GROW_AT = 1.25
_SHRINK_AT = 0.8


def wait_budget(consumer_timeout: float) -> float:
    """Seconds a prefetched message may wait unstarted."""
    return min(MAX_BUDGET, consumer_timeout * BUDGET_SHARE)


class AdaptiveWindow:
    """The prefetch window of one consumer (see the module documentation)."""

    __slots__ = ("_average", "_high", "budget", "cap", "concurrency", "window")

    def __init__(self, concurrency: int, budget: float, cap: int = WINDOW_CAP) -> None:
        self.concurrency = concurrency
        self.budget = budget
        self.cap = max(cap, concurrency)
        self.window = concurrency
        self._average = 0.0
        self._high = 0.0

    def observe(self, seconds: float) -> int | None:
        """Take one handler's duration; return the new window if it should change now."""
        if self._average == 0.0:
            self._average = seconds
        else:
            self._average += _AVERAGE_WEIGHT * (seconds - self._average)
        high = self._high * _HIGH_DECAY
        self._high = seconds if seconds > high else high
        target = self.target()
        window = self.window
        moved = target >= min(window * _GROW_AT, self.cap) or target <= window * _SHRINK_AT
        if moved and target != window:
            self.window = target
            return target
        return None

    def target(self) -> int:
        per_run = max(self._average, self._high, 1e-6)
        waiting = math.floor(self.budget / 2 * self.concurrency / per_run)
        return max(self.concurrency, min(self.cap, self.concurrency + waiting))

    @property
    def reason(self) -> str:
        """Why the window is what it is, in one sentence (made when asked, not per run)."""
        if self._average == 0.0:
            return "no handler has finished yet: the window is the concurrency"
        per_run = max(self._average, self._high)
        if self.window == self.concurrency:
            return (
                f"handlers take about {_seconds(per_run)}: no message can wait "
                f"{_seconds(self.budget)} unstarted, so none is sent ahead"
            )
        if self.window == self.cap:
            return f"handlers take about {_seconds(per_run)}: at the cap of {self.cap}"
        return (
            f"handlers take about {_seconds(per_run)}: {self.window - self.concurrency} "
            f"waiting start within {_seconds(self.budget)}"
        )


def _seconds(value: float) -> str:
    if value >= 1:
        return f"{value:.1f} s"
    if value >= 0.001:
        return f"{value * 1000:.1f} ms"
    return f"{value * 1e6:.0f} µs"
