"""Retry policy: how many attempts, which delays, which errors are permanent. Pure logic."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from ._backoff import backoff_delay
from ._errors import ConfigurationError, HandlerExit

# Delays are rounded to this ladder (times a power of ten, in seconds) so that a consumed queue
# needs a bounded number of retry queues (one per delay: a message's TTL only expires at the
# head of its queue, so a short delay must never sit behind a long one).
_LADDER = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0, 10.0)
_MIN_DELAY_MS = 10


@dataclass(frozen=True)
class RetryPolicy:
    """How a failing message is retried before it goes to the dead-letter queue.

    ``max_attempts``: handler runs per message, the first included (1 = never retry).
    ``delays``: explicit delays in seconds for retry 1, 2, ...; the last one repeats. Used
    exactly. Without it: exponential backoff from ``base`` doubling to ``cap``, with jitter,
    rounded to a ladder of 1, 1.5, 2, 3, 5, 7 x 10^k seconds.
    ``permanent``: exception types that are dead-lettered at once, without retry.
    ``max_deliveries``: a message started this many times without finishing (its handler
    killed the process, or blocked the event loop until the connection died, each time) is
    dead-lettered instead of run again.
    """

    max_attempts: int = 5
    delays: tuple[float, ...] | None = None
    base: float = 1.0
    cap: float = 300.0
    jitter: bool = True
    permanent: tuple[type[BaseException], ...] = ()
    max_deliveries: int = 5
    _exact: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError("max_attempts must be >= 1")
        if self.max_deliveries < 1:
            raise ConfigurationError("max_deliveries must be >= 1")
        if self.delays is not None:
            delays = tuple(float(d) for d in self.delays)
            if not delays or any(not (d >= 0 and math.isfinite(d)) for d in delays):
                raise ConfigurationError("retry delays must be one or more numbers >= 0")
            object.__setattr__(self, "delays", delays)
        if not (0 < self.base <= self.cap and math.isfinite(self.cap)):
            raise ConfigurationError("need 0 < base <= cap for retry backoff")
        for kind in self.permanent:
            if not (isinstance(kind, type) and issubclass(kind, BaseException)):
                raise ConfigurationError(f"permanent must list exception types, not {kind!r}")
        exact = frozenset(_to_ms(d) for d in self.delays or ())
        object.__setattr__(self, "_exact", exact)

    def delay(self, retry: int, random: Callable[[], float]) -> float:
        """Seconds before retry number ``retry`` (1 for the first retry)."""
        if retry < 1:
            raise ValueError("retry numbers start at 1")
        if self.delays is not None:
            return self.delays[min(retry, len(self.delays)) - 1]
        if self.jitter:
            return backoff_delay(retry - 1, base=self.base, cap=self.cap, random=random)
        return min(self.cap, self.base * 2.0 ** min(retry - 1, 64))

    def bucket_ms(self, delay: float) -> int:
        """The retry queue (its TTL in milliseconds) that serves ``delay`` seconds."""
        ms = _to_ms(delay)
        return ms if ms in self._exact else ladder_ms(delay)

    def is_permanent(self, exc: BaseException) -> bool:
        """Whether ``exc`` is of a ``permanent`` type; for a :class:`HandlerExit`, whether the
        SystemExit (or the like) that the handler raised is."""
        if isinstance(exc, HandlerExit) and isinstance(exc.exception, self.permanent):
            return True
        return isinstance(exc, self.permanent)


def _to_ms(delay: float) -> int:
    return max(_MIN_DELAY_MS, round(delay * 1000))


def ladder_ms(delay: float) -> int:
    """Round ``delay`` seconds to the nearest ladder step, in log space; in milliseconds."""
    ms = _to_ms(delay)
    exponent = math.floor(math.log10(ms))
    scale = 10.0**exponent
    mantissa = ms / scale
    step = min(_LADDER, key=lambda s: abs(math.log(mantissa / s)))
    return max(_MIN_DELAY_MS, round(step * scale))
