"""steadyrabbit.testing.run_handler: a handler's decision in milliseconds, without a broker."""

from __future__ import annotations

from typing import Any

import pytest

from steadyrabbit import App, Message, Middleware, Outcome, Reject, Retry, RetryPolicy
from steadyrabbit._headers import ATTEMPTS
from steadyrabbit._middleware import CallNext
from steadyrabbit.testing import run_handler, run_handler_sync

app = App(retry=RetryPolicy(max_attempts=3, delays=(5,)))
calls: list[Any] = []


@app.consumer("contracts", decode="json")
def report(message: Message) -> None:
    calls.append(message.payload)
    if "id" not in message.payload:
        raise Reject("no contract id")
    if message.payload["id"] == "busy":
        raise Retry("backend busy", delay=30)
    if message.payload["id"] == "bug":
        raise ValueError("unexpected")


@app.consumer("audit")
async def audit(message: Message) -> None:
    calls.append(message.attempt)


def test_each_outcome_of_a_sync_handler() -> None:
    ok = run_handler_sync(app, "contracts", b'{"id": "c-1"}')
    assert ok.outcome is Outcome.ACK
    rejected = run_handler_sync(app, "contracts", b"{}")
    assert (rejected.outcome, rejected.reason) == (Outcome.DEAD_LETTER, "no contract id")
    assert rejected.target == "contracts.dlq"
    busy = run_handler_sync(app, "contracts", b'{"id": "busy"}')
    assert (busy.outcome, busy.delay, busy.target) == (Outcome.RETRY, 30, "contracts.retry.30000ms")
    bug = run_handler_sync(app, "contracts", b'{"id": "bug"}', headers={ATTEMPTS: 2})
    assert bug.outcome is Outcome.DEAD_LETTER
    assert bug.reason == "gave up after 3 attempts: ValueError: unexpected"
    bad_body = run_handler_sync(app, "contracts", b"not json")
    assert bad_body.outcome is Outcome.DEAD_LETTER
    assert bad_body.reason is not None
    assert bad_body.reason.startswith("undecodable body: JSONDecodeError")


@pytest.mark.anyio
async def test_an_async_handler_and_its_middleware_from_a_running_loop() -> None:
    seen: list[str] = []

    class Tag(Middleware):
        async def around_handler(self, message: Message, call_next: CallNext) -> Any:
            seen.append("before")
            return await call_next(message)

    tagged = App(middleware=[Tag()])
    tagged.add_consumer(audit, "audit")

    decision = await run_handler(tagged, "audit", b"x", headers={ATTEMPTS: 1})
    assert decision.outcome is Outcome.ACK
    assert decision.attempt == 2
    assert seen == ["before"]
    assert calls[-1] == 2
