"""What becomes of a message once its handler is done: a pure decision, no broker involved.

:func:`decide` maps the handler's error (or None), the message's headers and the retry policy
to a :class:`Decision`; the consumer then carries it out (ack, or copy, confirm, ack).
"""

from __future__ import annotations

import enum
import random as _random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from . import _headers
from ._errors import HandlerExit, Reject, Retry
from ._retry import RetryPolicy
from ._url import mask_url

_MAX_REASON = 1000


class Outcome(enum.Enum):
    """What happens to a message once its handler is done with it."""

    ACK = "ack"  # handled: acked
    RETRY = "retry"  # a copy waits in a retry queue, then comes back; the original is acked
    DEAD_LETTER = "dead_letter"  # a copy goes to <queue>.dlq with the reason; original acked


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one delivery and why.

    ``attempt``: this run's number (1 for a first delivery). ``reason`` and ``error_type``:
    None for an ack. ``delay``: seconds before a retry comes back. ``target``: the queue the
    copy goes to (set once the consumer chose it; None for an ack).
    """

    outcome: Outcome
    attempt: int
    reason: str | None = None
    error_type: str | None = None
    delay: float | None = None
    target: str | None = None


ACK_FIRST = Decision(Outcome.ACK, 1)


class CrashLoop(Exception):
    """The message was started ``starts`` times without finishing (see the crash guard)."""

    def __init__(self, starts: int) -> None:
        super().__init__(
            f"started {starts} times without finishing: its handler kept crashing the process "
            "or its connection"
        )
        self.starts = starts


def decide(
    error: BaseException | None,
    headers: Mapping[str, Any] | None,
    policy: RetryPolicy,
    *,
    random: Callable[[], float] = _random.random,
) -> Decision:
    """The decision for a delivery whose handler ended with ``error`` (None: it returned).

    - returned: ack;
    - :class:`Reject` (a bad body is one): dead letter with its reason;
    - :class:`Retry`: retry after its delay or the policy's, until ``max_attempts``;
    - an exception type the policy calls permanent: dead letter;
    - :class:`CrashLoop`: dead letter, named ``CrashLoop``;
    - any other exception: retry, until ``max_attempts``, then dead letter ("gave up").
    """
    attempt = _headers.attempts(headers) + 1
    if error is None:
        return ACK_FIRST if attempt == 1 else Decision(Outcome.ACK, attempt)
    delay: float | None = None
    if isinstance(error, Reject):
        outcome, reason = Outcome.DEAD_LETTER, error.reason
        error_type = qualified_name(error.__cause__ or error)
    elif isinstance(error, CrashLoop):
        outcome, reason, error_type = Outcome.DEAD_LETTER, str(error), "CrashLoop"
    elif isinstance(error, Retry):
        outcome, reason, delay = Outcome.RETRY, error.reason, error.delay
        error_type = qualified_name(error.__cause__ or error)
    else:
        if isinstance(error, HandlerExit):  # sys.exit() in a handler: name what it raised
            reason, error_type = str(error), qualified_name(error.exception)
        else:
            reason, error_type = f"{type(error).__name__}: {error}", qualified_name(error)
        outcome = Outcome.DEAD_LETTER if policy.is_permanent(error) else Outcome.RETRY
    if outcome is Outcome.RETRY and attempt >= policy.max_attempts:
        outcome, reason = Outcome.DEAD_LETTER, f"gave up after {attempt} attempts: {reason}"
    if outcome is Outcome.RETRY and delay is None:
        delay = policy.delay(attempt, random)
    # An exception's text may carry a URL with a password or a token (httpx errors do); the
    # reason is stored on the broker and shown by `dlq`, so it is masked here.
    return Decision(outcome, attempt, mask_url(reason)[:_MAX_REASON], error_type, delay)


def retry_bucket_ms(decision: Decision, policy: RetryPolicy) -> int | None:
    """The delay (ms) of the retry queue a retry decision goes to; None for any other."""
    if decision.outcome is not Outcome.RETRY:
        return None
    return policy.bucket_ms(decision.delay or 0.0)


def qualified_name(exc: BaseException) -> str:
    kind = type(exc)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"
