"""Retry and dead-letter copies go only where steadyrabbit sends them, once, on the real broker.

A copy never carries what changes its routing (``CC``/``BCC``) or whom the broker checks it
against (``user_id``); a copy the broker refuses ends in a decision, never a loop; a copy whose
original's channel died is not made twice; a handler sees the original exchange, routing key and
its attempt number on every delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import pika
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from steadyrabbit import (
    App,
    Message,
    Outcome,
    Properties,
    PublishRefusedError,
    Reject,
    Retry,
    RetryPolicy,
    Worker,
)
from steadyrabbit._headers import BCC, CC, PUBLISH_ID, REASON, USER_ID, routing_neutral
from steadyrabbit._message import persistent_copy
from tests._broker import BrokerNode, main_broker_ctl
from tests._strategies import HEADER_VALUES
from tests.conftest import Admin, MakeSettings, Settled, eventually

pytestmark = pytest.mark.anyio


def _always_failing_app(queue: str, runs: list[bytes]) -> App:
    app = App(retry=RetryPolicy(max_attempts=3, delays=(0.05,)))

    @app.consumer(queue)
    async def fail(message: Message) -> None:
        runs.append(message.body)
        raise RuntimeError("always")

    return app


async def test_a_cc_header_naming_the_queue_never_fans_the_copies_out(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    """Issue 8.1: CC named the consumed queue, BCC another; each failure re-entered the queue.
    Now: max_attempts runs, one dead letter, the BCC queue keeps only the original's copy."""
    other = f"{queue_name}-other"
    admin.declare(queue_name)
    admin.declare(other)
    runs: list[bytes] = []
    app = _always_failing_app(queue_name, runs)
    admin.publish(
        queue_name,
        [b"fan-out"],
        properties=pika.BasicProperties(
            delivery_mode=2, headers={"CC": [queue_name], "BCC": [other], "x-user": "kept"}
        ),
    )

    try:
        async with Worker(app, make_settings()) as worker:
            await eventually(lambda: worker.stats.dead_lettered == 1, what="the dead letter")
            await asyncio.sleep(1.0)  # a fan-out would show more runs by now
        assert runs == [b"fan-out"] * 3
        assert admin.counts(other) == (1, 0)  # the original's BCC copy, no more
        [(props, body)] = admin.drain(f"{queue_name}.dlq")
        headers = props.headers or {}
        assert body == b"fan-out"
        assert "CC" not in headers
        assert headers[CC] == [queue_name]
        assert BCC not in headers  # the broker strips BCC before delivery: nothing to keep
        assert headers["x-user"] == "kept"
        assert admin.counts(queue_name) == (0, 0)
    finally:
        admin.delete(other, f"{queue_name}.retry.50ms")


_HEADERS = st.dictionaries(
    st.text(min_size=1, max_size=12).filter(lambda k: not k.startswith("x-steadyrabbit-")),
    HEADER_VALUES,
    max_size=5,
)


@given(headers=_HEADERS, cc=st.lists(st.sampled_from(["q", "other"]), max_size=3))
def test_a_copy_never_carries_routing_headers_or_a_user_id(
    headers: dict[str, Any], cc: list[str]
) -> None:
    """Any headers, any CC/BCC, any user_id: the copy keeps every user header except CC/BCC,
    which move under steadyrabbit's own names, and has no user_id."""
    original = dict(headers)
    if cc:
        original["CC"] = cc
        original["BCC"] = list(reversed(cc))
    props = Properties(headers=original, user_id="someone")
    copy = persistent_copy(props, routing_neutral(original))
    assert copy.user_id is None
    copied = copy.headers or {}
    assert "CC" not in copied
    assert "BCC" not in copied
    assert copied[USER_ID] == "someone"
    for key, value in original.items():
        if key == "CC":
            assert copied[CC] == value
        elif key == "BCC":
            assert copied[BCC] == value
        else:
            assert copied[key] == value


@hypothesis_settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(headers=_HEADERS, targets=st.lists(st.sampled_from(["self", "other"]), max_size=3))
async def test_generated_headers_give_exactly_max_attempts_runs_and_one_dead_letter(
    admin: Admin, headers: dict[str, Any], targets: list[str], make_settings: MakeSettings
) -> None:
    """On the broker, for generated headers with CC/BCC naming the queue or another one."""
    queue = f"sr-test-copies-{uuid.uuid4().hex[:8]}"
    other = f"{queue}-other"
    names = {"self": queue, "other": other}
    routed = [names[t] for t in targets]
    admin.declare(queue)
    admin.declare(other)
    runs: list[bytes] = []
    app = _always_failing_app(queue, runs)
    sent = {**headers, **({"CC": routed} if routed else {})}
    admin.publish(queue, [b"m"], properties=pika.BasicProperties(delivery_mode=2, headers=sent))

    try:
        async with Worker(app, make_settings()) as worker:
            await eventually(lambda: worker.stats.dead_lettered == 1, what="the dead letter")
            await asyncio.sleep(0.3)
        assert runs == [b"m"] * 3
        assert admin.counts(other) == ((1 if other in routed else 0), 0)
        assert admin.counts(f"{queue}.dlq") == (1, 0)
        assert admin.counts(queue) == (0, 0)
    finally:
        admin.delete(queue, other, f"{queue}.dlq", f"{queue}.retry.50ms")


@pytest.fixture
def impersonator() -> Any:
    """A user that may publish with any user_id (the 'impersonator' tag), as a gateway might."""
    name = f"sr-impersonator-{uuid.uuid4().hex[:6]}"
    main_broker_ctl("add_user", name, "impersonate-pw")
    try:
        main_broker_ctl("set_user_tags", name, "impersonator")
        main_broker_ctl("set_permissions", "-p", "/", name, ".*", ".*", ".*")
        yield Admin(f"amqp://{name}:impersonate-pw@127.0.0.1:5672/%2F")
    finally:
        main_broker_ctl("delete_user", name)


async def test_a_foreign_user_id_is_retried_and_dead_lettered(
    queue_name: str, admin: Admin, impersonator: Admin, make_settings: MakeSettings
) -> None:
    """Issue 8.2: the worker (guest) could never publish a copy of a message whose user_id
    named someone else (406, retried forever). Now the copy carries the id as a header."""
    admin.declare(queue_name)
    runs: list[bytes] = []
    app = _always_failing_app(queue_name, runs)
    impersonator.publish(
        queue_name, [b"from a gateway"],
        properties=pika.BasicProperties(delivery_mode=2, user_id="alice"),
    )

    try:
        async with Worker(app, make_settings()) as worker:
            await eventually(
                lambda: worker.stats.dead_lettered == 1, within=20, what="the dead letter"
            )
        assert runs == [b"from a gateway"] * 3
        [(props, _body)] = admin.drain(f"{queue_name}.dlq")
        assert props.user_id is None
        assert (props.headers or {})[USER_ID] == "alice"
    finally:
        admin.delete(f"{queue_name}.retry.50ms")


@contextlib.contextmanager
def _refusing_policy(name: str, queue: str) -> Any:
    """A policy that makes ``queue`` refuse every publish (full at 0, reject-publish)."""
    main_broker_ctl(
        "set_policy", name, f"^{queue.replace('.', '[.]')}$",
        '{"max-length": 0, "overflow": "reject-publish"}', "--apply-to", "queues",
    )
    try:
        yield
    finally:
        main_broker_ctl("clear_policy", name)


async def test_a_refused_retry_copy_is_dead_lettered_with_the_reason(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    """Issue 8.2, the class: a permanent refusal (here a nack from a retry queue that rejects
    publishes) is a decision, not a retry loop: the message is dead-lettered, saying why."""
    retry_queue = f"{queue_name}.retry.50ms"
    admin.declare(queue_name)
    runs: list[bytes] = []
    app = _always_failing_app(queue_name, runs)
    admin.publish(queue_name, [b"refused retry"])
    try:
        with _refusing_policy(f"{queue_name}-policy", retry_queue):

            async with Worker(app, make_settings()) as worker:
                await eventually(
                    lambda: worker.stats.dead_lettered == 1, what="the dead letter"
                )
        assert runs == [b"refused retry"]
        [(props, _body)] = admin.drain(f"{queue_name}.dlq")
        reason = str((props.headers or {})[REASON])
        assert "RuntimeError: always" in reason
        assert "refused" in reason
    finally:
        admin.delete(retry_queue)


async def test_a_refused_dead_letter_stops_the_worker_and_keeps_the_message(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    """A dead-letter queue that refuses publishes: the worker stops with one sentence naming
    the queue and what to check; the message is back in its queue, not looping."""
    admin.declare(queue_name)
    app = App()
    runs: list[bytes] = []

    @app.consumer(queue_name)
    async def reject(message: Message) -> None:
        runs.append(message.body)
        raise Reject("bad")

    admin.publish(queue_name, [b"refused dead letter"])
    with _refusing_policy(f"{queue_name}-policy", f"{queue_name}.dlq"):
        async with Worker(app, make_settings()) as worker:
            error = await asyncio.wait_for(worker.wait_failed(), 30)
    assert isinstance(error, PublishRefusedError)
    assert f"{queue_name}.dlq" in str(error)
    assert "\n" not in str(error)
    assert runs == [b"refused dead letter"]
    assert admin.counts(queue_name) == (1, 0)


async def test_the_handler_sees_the_original_routing_key_and_its_attempt_on_every_delivery(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    """Issue 8.14: a retry came back with the queue name as routing key and the default
    exchange; now exchange, routing key and attempt number are those of the message."""
    exchange = f"{queue_name}-x"
    app = App(retry=RetryPolicy(delays=(0.05,)))
    seen: list[tuple[str, str, int, bool]] = []

    @app.consumer(queue_name, exchange=exchange, routing_key="purchasing.#")
    async def handle(message: Message) -> None:
        seen.append(
            (message.exchange, message.routing_key, message.attempt, PUBLISH_ID in message.headers)
        )
        if message.attempt < 3:
            raise Retry("again", delay=0.05)

    try:
        async with Worker(app, make_settings()) as worker:
            await admin.run(
                admin.publish, queue_name, [b"contract"], exchange=exchange,
                routing_key="purchasing.system.contract",
            )
            await eventually(lambda: worker.stats.succeeded == 1, what="the third attempt")
    finally:
        admin.delete(f"{queue_name}.retry.50ms")
        admin.delete_exchange(exchange)
    assert seen == [(exchange, "purchasing.system.contract", n, False) for n in (1, 2, 3)]


@pytest.mark.slow
@pytest.mark.private_node
async def test_a_memory_alarm_does_not_pile_up_copies(
    private_node: BrokerNode, private_admin: Admin, tmp_path: Any, make_settings: MakeSettings
) -> None:
    """Issue 8.12: during a memory alarm the publishing connection is blocked; each
    consumer_timeout (5 s) cycle used to leave one more copy in it. Now the redelivered
    original waits for the copy already on its way: one dead letter, one handler run."""
    queue = f"alarm-{uuid.uuid4().hex[:6]}"
    private_admin.declare(queue)
    private_admin.publish(queue, [b"rejected during an alarm"])
    app = App()
    runs: list[bytes] = []

    @app.consumer(queue)
    async def reject(message: Message) -> None:
        runs.append(message.body)
        raise Reject("no")

    try:
        worker_settings = make_settings(
            private_node.url, state_dir=tmp_path, reconnect_delay=0.2, reconnect_delay_max=1.0
        )
        await asyncio.to_thread(private_node.ctl, "set_vm_memory_high_watermark", "0.000001")
        try:
            async with Worker(app, worker_settings) as worker:
                # Two consumer_timeout cycles with the copy stuck in the blocked publisher.
                await eventually(
                    lambda: worker.stats.channel_recoveries >= 2, within=40,
                    what="two channels closed by consumer_timeout",
                )
                await asyncio.to_thread(
                    private_node.ctl, "set_vm_memory_high_watermark", "0.4"
                )
                await eventually(
                    lambda: worker.stats.dead_lettered == 1, within=30, what="the dead letter"
                )
                await asyncio.sleep(2.0)  # any other copy would be enqueued by now
        finally:
            await asyncio.to_thread(private_node.ctl, "set_vm_memory_high_watermark", "0.4")
        assert runs == [b"rejected during an alarm"]
        assert private_admin.counts(f"{queue}.dlq") == (1, 0)
        assert private_admin.counts(queue) == (0, 0)
    finally:
        private_admin.delete(queue, f"{queue}.dlq")


async def test_an_unroutable_copy_is_logged_as_returned_not_as_a_closed_channel(
    queue_name: str, admin: Admin, caplog: pytest.LogCaptureFixture, make_settings: MakeSettings
) -> None:
    """Issue 8.18: a copy returned as unroutable (its retry queue deleted under the worker) was
    logged as "channel closed by the broker: 312 NO_ROUTE" although the channel stays open.
    Now the log says what happened, the queue is declared again and the copy delivered."""
    retry_queue = f"{queue_name}.retry.50ms"
    admin.declare(queue_name)
    app = App(retry=RetryPolicy(delays=(0.05,)))
    attempts: list[int] = []
    deleted = asyncio.Event()

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        attempts.append(message.attempt)
        if message.attempt == 2:
            await asyncio.to_thread(admin.delete, retry_queue)  # an operator's clean-up
            deleted.set()
        if message.attempt < 3:
            raise Retry("again")

    try:
        async with Worker(app, make_settings()) as worker:
            await admin.run(admin.publish, queue_name, [b"returned once"])
            await eventually(lambda: worker.stats.succeeded == 1, what="the third attempt")
    finally:
        admin.delete(retry_queue)
    assert attempts == [1, 2, 3]
    messages = [r.getMessage() for r in caplog.records]
    assert any("returned it as unroutable" in m for m in messages), messages
    assert not any("channel closed by the broker: 312" in m for m in messages)


async def test_a_dead_letters_reason_names_no_password_or_token(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    """Invariant 10: a handler's exception text often carries the URL it called (httpx errors
    do). The reason stored on the broker masks its password and query values."""
    admin.declare(queue_name)
    settled = Settled()
    app = App(middleware=[settled])

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        raise Reject("calling https://svc:Pa55-w0rd@api.example/v1?token=tok-SECRET-42 failed")

    async with Worker(app, make_settings()):
        await admin.run(admin.publish, queue_name, [b"m"])
        await settled.wait_for(1, Outcome.DEAD_LETTER)
    [(props, _body)] = admin.drain(f"{queue_name}.dlq")
    reason = str((props.headers or {})[REASON])
    assert "api.example/v1?token=****" in reason
    assert "Pa55-w0rd" not in reason
    assert "tok-SECRET-42" not in reason
