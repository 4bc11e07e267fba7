"""steadyrabbit.testing.run_handler: a handler's decision in milliseconds, without a broker."""

from __future__ import annotations

from typing import Any

import pytest

from steadyrabbit import (
    App,
    Message,
    Middleware,
    Outcome,
    Publish,
    Reject,
    Retry,
    RetryPolicy,
)
from steadyrabbit._headers import ATTEMPTS
from steadyrabbit._middleware import CallNext, PublishNext
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
    ok = run_handler_sync(app, "contracts", b'{"id": "c-1"}').decision
    assert ok.outcome is Outcome.ACK
    rejected = run_handler_sync(app, "contracts", b"{}").decision
    assert (rejected.outcome, rejected.reason) == (Outcome.DEAD_LETTER, "no contract id")
    assert rejected.target == "contracts.dlq"
    busy = run_handler_sync(app, "contracts", b'{"id": "busy"}').decision
    assert (busy.outcome, busy.delay, busy.target) == (Outcome.RETRY, 30, "contracts.retry.30000ms")
    bug = run_handler_sync(app, "contracts", b'{"id": "bug"}', headers={ATTEMPTS: 2}).decision
    assert bug.outcome is Outcome.DEAD_LETTER
    assert bug.reason == "gave up after 3 attempts: ValueError: unexpected"
    bad_body = run_handler_sync(app, "contracts", b"not json").decision
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

    decision = (await run_handler(tagged, "audit", b"x", headers={ATTEMPTS: 1})).decision
    assert decision.outcome is Outcome.ACK
    assert decision.attempt == 2
    assert seen == ["before"]
    assert calls[-1] == 2


pipeline = App()


@pipeline.consumer("orders", decode="json")
async def price(message: Message) -> None:
    order = message.payload
    await message.publisher.publish(
        {"order": order["id"], "total": order["qty"] * 3},
        exchange="billing",
        routing_key="invoice.created",
        headers={"x-source": "orders"},
    )
    if order["qty"] > 10:
        await message.publisher.publish(b"big", routing_key="review", message_id="r-1")
    if order["qty"] < 0:
        raise Reject("negative quantity")


@pipeline.consumer("legacy")
def forward(message: Message) -> None:
    message.blocking_publisher.publish("as text", routing_key="legacy.out", delay=2.5)


def test_the_stub_returns_what_the_handler_published_in_order() -> None:
    result = run_handler_sync(pipeline, "orders", b'{"id": "o-1", "qty": 11}')
    assert result.decision.outcome is Outcome.ACK
    invoice, review = result.published
    assert (invoice.exchange, invoice.routing_key) == ("billing", "invoice.created")
    assert invoice.json() == {"order": "o-1", "total": 33}
    assert invoice.content_type == "application/json"
    assert invoice.headers == {"x-source": "orders"}
    assert len(invoice.message_id) == 32  # one is made when none is given
    assert (review.exchange, review.routing_key, review.body) == ("", "review", b"big")
    assert (review.message_id, review.content_type, review.persistent) == ("r-1", None, True)

    small = run_handler_sync(pipeline, "orders", b'{"id": "o-2", "qty": 1}')
    assert [p.routing_key for p in small.published] == ["invoice.created"]


def test_a_failed_handler_reports_what_it_published_before_failing() -> None:
    # The worker would have published it too: a publish is confirmed when it returns, and the
    # failure that follows does not take it back.
    result = run_handler_sync(pipeline, "orders", b'{"id": "o-3", "qty": -1}')
    assert result.decision.outcome is Outcome.DEAD_LETTER
    assert [p.json()["order"] for p in result.published] == ["o-3"]


def test_a_sync_handler_publishes_through_the_blocking_publisher() -> None:
    (sent,) = run_handler_sync(pipeline, "legacy", b"x").published
    assert (sent.routing_key, sent.body, sent.delay) == ("legacy.out", b"as text", 2.5)
    assert sent.content_type == "text/plain; charset=utf-8"


@pytest.mark.anyio
async def test_around_publish_middleware_sees_and_may_change_a_handlers_publishes() -> None:
    class Trace(Middleware):
        async def around_publish(self, publish: Publish, call_next: PublishNext) -> None:
            assert not publish.copy
            publish.headers["traceparent"] = f"00-{publish.message_id}"
            await call_next(publish)

    traced = App(middleware=[Trace()])
    traced.add_consumer(price, "orders", decode="json")
    result = await run_handler(traced, "orders", b'{"id": "o-4", "qty": 2}')
    (invoice,) = result.published
    assert invoice.headers == {"x-source": "orders", "traceparent": f"00-{invoice.message_id}"}
