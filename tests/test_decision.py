"""decide(): the outcome of a delivery, as a pure function (no broker)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from steadyrabbit import Decision, HandlerExit, Outcome, Reject, Retry, RetryPolicy, decide
from steadyrabbit._decision import CrashLoop
from steadyrabbit._headers import ATTEMPTS
from tests._strategies import HEADER_VALUES

POLICY = RetryPolicy(max_attempts=3, delays=(10, 60), permanent=(KeyError,))


def never_random() -> float:
    return 0.5


def test_a_returned_handler_is_acked() -> None:
    assert decide(None, None, POLICY) == Decision(Outcome.ACK, 1)
    assert decide(None, {ATTEMPTS: 2}, POLICY) == Decision(Outcome.ACK, 3)


def test_reject_dead_letters_with_its_reason_and_cause() -> None:
    try:
        try:
            {"name": "x"}["id"]
        except KeyError as exc:
            raise Reject("no contract id") from exc
    except Reject as reject:
        decision = decide(reject, None, POLICY)
    assert decision == Decision(Outcome.DEAD_LETTER, 1, "no contract id", "KeyError")


def test_a_bad_body_is_a_reject() -> None:
    decision = decide(Reject("undecodable body: JSONDecodeError: x"), None, POLICY)
    assert decision.outcome is Outcome.DEAD_LETTER
    assert decision.reason == "undecodable body: JSONDecodeError: x"


def test_retry_uses_its_delay_or_the_policys() -> None:
    assert decide(Retry("busy", delay=30), None, POLICY).delay == 30
    assert decide(Retry("busy"), None, POLICY).delay == 10
    assert decide(Retry("busy"), {ATTEMPTS: 1}, POLICY).delay == 60
    assert decide(Retry("busy"), None, POLICY).outcome is Outcome.RETRY


def test_an_error_is_retried_then_given_up() -> None:
    first = decide(ValueError("bad"), None, POLICY)
    assert (first.outcome, first.attempt, first.reason) == (Outcome.RETRY, 1, "ValueError: bad")
    last = decide(ValueError("bad"), {ATTEMPTS: 2}, POLICY)
    assert last.outcome is Outcome.DEAD_LETTER
    assert last.reason == "gave up after 3 attempts: ValueError: bad"
    assert last.delay is None


def test_a_permanent_type_is_dead_lettered_at_once() -> None:
    decision = decide(KeyError("x"), None, POLICY)
    assert decision.outcome is Outcome.DEAD_LETTER
    assert decision.error_type == "KeyError"


def test_a_crash_loop_is_dead_lettered_naming_it() -> None:
    decision = decide(CrashLoop(5), {ATTEMPTS: 1}, POLICY)
    assert decision.outcome is Outcome.DEAD_LETTER
    assert decision.error_type == "CrashLoop"
    assert decision.reason is not None
    assert decision.reason.startswith("started 5 times without finishing")


def test_sys_exit_in_a_handler_is_named_as_what_it_raised() -> None:
    decision = decide(HandlerExit(SystemExit(3)), None, RetryPolicy(max_attempts=1))
    assert decision.reason == "gave up after 1 attempts: SystemExit: 3"
    assert decision.error_type == "SystemExit"


def test_the_reason_masks_secrets_and_is_bounded() -> None:
    decision = decide(Reject("GET https://u:pw-123456@h/x?token=t0k3n-abc " + "x" * 5000), None,
                      POLICY)
    assert decision.reason is not None
    assert "pw-123456" not in decision.reason
    assert "t0k3n-abc" not in decision.reason
    assert len(decision.reason) == 1000


_ERRORS = st.one_of(
    st.none(),
    st.builds(Reject, st.text(max_size=50)),
    st.builds(Retry, st.text(max_size=50), delay=st.none() | st.floats(0, 1e6)),
    st.builds(ValueError, st.text(max_size=50)),
    st.builds(KeyError, st.text(max_size=5)),
    st.builds(CrashLoop, st.integers(1, 100)),
)


@given(
    error=_ERRORS,
    headers=st.none() | st.dictionaries(st.sampled_from([ATTEMPTS, "x-other"]), HEADER_VALUES),
    max_attempts=st.integers(1, 6),
)
def test_any_input_gives_a_consistent_decision(
    error: Exception | None, headers: dict[str, Any] | None, max_attempts: int
) -> None:
    policy = RetryPolicy(max_attempts=max_attempts, permanent=(KeyError,))
    decision = decide(error, headers, policy, random=never_random)
    attempts = (headers or {}).get(ATTEMPTS)
    recorded = (
        attempts if isinstance(attempts, int) and not isinstance(attempts, bool) and attempts > 0
        else 0
    )
    assert decision.attempt == recorded + 1
    if error is None:
        assert decision.outcome is Outcome.ACK
        return
    assert decision.reason is not None
    assert len(decision.reason) <= 1000
    if decision.outcome is Outcome.RETRY:
        assert decision.attempt < max_attempts
        assert decision.delay is not None
        assert decision.delay >= 0
    else:
        assert decision.outcome is Outcome.DEAD_LETTER


def test_retry_refuses_a_negative_delay() -> None:
    with pytest.raises(ValueError, match="delay"):
        Retry("x", delay=-1)
