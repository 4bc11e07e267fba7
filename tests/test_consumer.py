"""On the machine's broker: the seed-2 incident, outcomes, prefetch, topology, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable

import pika
import pytest
from hypothesis import given
from hypothesis import strategies as st

from steadyrabbit import (
    App,
    AuthenticationError,
    BrokerUnreachableError,
    ConfigurationError,
    Message,
    Outcome,
    Reject,
    RetryPolicy,
    Worker,
)
from tests._broker import main_broker_ctl
from tests.conftest import MAIN_URL, Admin, MakeSettings, Settled, eventually

pytestmark = pytest.mark.anyio


@pytest.mark.slow  # waits out broker timeouts or processes: CI's slow pass
async def test_seed2_sync_handler_blocking_past_heartbeats_is_acked_once(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    """Heartbeat 2 s, a handler that blocks 10 s: the broker would drop a starved connection
    after two missed heartbeats (4 s) and redeliver; here it is acked once, no reconnect."""
    admin.declare(queue_name)
    admin.publish(queue_name, [b"long job"])
    calls: list[bytes] = []
    app = App()

    @app.consumer(queue_name)
    def handle(message: Message) -> None:
        calls.append(message.body)
        time.sleep(10)

    async with Worker(app, make_settings(heartbeat=2)) as worker:
        assert worker.negotiated_heartbeat == 2
        await eventually(lambda: worker.stats.acked == 1, within=30, what="the ack")
    assert calls == [b"long job"]
    assert worker.stats.reconnect_count == 0
    assert worker.stats.stale_settlements_dropped == 0
    assert admin.counts(queue_name) == (0, 0)


async def test_an_async_handler_that_blocks_the_loop_is_named(
    queue_name: str, admin: Admin, caplog: pytest.LogCaptureFixture, make_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    admin.publish(queue_name, [b"x"])
    app = App()

    @app.consumer(queue_name)
    async def blocking_handler(message: Message) -> None:
        time.sleep(1.5)  # the mistake the watchdog exists for  # noqa: ASYNC251

    with caplog.at_level(logging.WARNING, logger="steadyrabbit"):
        async with Worker(app, make_settings(loop_lag_threshold=0.4)) as worker:
            await eventually(lambda: worker.stats.acked == 1, what="the ack")
    assert worker.stats.loop_stalls >= 1
    messages = [record.getMessage() for record in caplog.records]
    blocked = [m for m in messages if "event loop has been blocked" in m]
    assert blocked, caplog.text
    assert "blocking_handler" in blocked[0]
    assert f"queue {queue_name!r}" in blocked[0]


async def test_failures_go_to_the_dead_letter_queue_with_the_reason(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    bodies = [b'{"n": 1}', b"not json {", b'{"n": 2, "fail": true}', b'{"n": 3, "reject": 1}']
    admin.publish(queue_name, bodies)
    handled: list[object] = []
    settled = Settled()
    app = App(middleware=[settled])

    @app.consumer(queue_name, decode="json", concurrency=2, retry=RetryPolicy(max_attempts=1))
    async def handle(message: Message) -> None:
        if message.payload.get("fail"):
            raise ValueError("cannot handle n=2")
        if message.payload.get("reject"):
            raise Reject("n=3 is not for us")
        handled.append(message.payload)

    async with Worker(app, make_settings()) as worker:
        await settled.wait_for(4)
    assert settled.count(Outcome.DEAD_LETTER) == 3
    assert worker.stats.dead_lettered == 3
    assert worker.stats.acked == 4
    assert handled == [{"n": 1}]
    assert worker.stats.handler_errors == 1
    assert admin.counts(queue_name) == (0, 0)
    dead = {
        body: {k: str(v) for k, v in (props.headers or {}).items()}
        for props, body in admin.drain(f"{queue_name}.dlq")
    }
    assert set(dead) == set(bodies[1:])
    undecodable = dead[b"not json {"]["x-steadyrabbit-reason"]
    assert undecodable.startswith("undecodable body: JSONDecodeError")
    assert dead[b"not json {"]["x-steadyrabbit-exception"] == "json.decoder.JSONDecodeError"
    failed = dead[b'{"n": 2, "fail": true}']
    reason = "gave up after 1 attempts: ValueError: cannot handle n=2"
    assert failed["x-steadyrabbit-reason"] == reason
    assert failed["x-steadyrabbit-attempts"] == "1"
    assert failed["x-steadyrabbit-exception"] == "ValueError"
    assert failed["x-steadyrabbit-queue"] == queue_name
    assert failed["x-steadyrabbit-routing-key"] == queue_name
    assert "T" in failed["x-steadyrabbit-failed-at"]
    assert dead[b'{"n": 3, "reject": 1}']["x-steadyrabbit-reason"] == "n=3 is not for us"


async def test_prefetch_defaults_to_concurrency_so_the_backlog_stays_in_the_broker(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    admin.publish(queue_name, [str(i).encode() for i in range(10)])
    release = threading.Event()
    started = threading.Semaphore(0)
    app = App()

    @app.consumer(queue_name, concurrency=2)
    def handle(message: Message) -> None:
        started.release()
        release.wait(30)

    async with Worker(app, make_settings()) as worker:
        for _ in range(2):
            assert await asyncio.to_thread(started.acquire, True, 10)
        # Two running, none waiting in this process: 8 stay ready in the broker.
        assert admin.counts(queue_name) == (8, 1)
        assert worker.in_flight == 2
        release.set()
        await eventually(lambda: worker.stats.acked == 10, what="10 acks")
    assert worker.stats.delivered == 10
    assert admin.counts(queue_name) == (0, 0)


@pytest.mark.parametrize(
    "arguments",
    [{"x-queue-type": "quorum"}, {"x-max-length": 1000, "x-message-ttl": 3_600_000}],
    ids=["quorum", "classic-with-arguments"],
)
async def test_an_existing_queue_is_consumed_as_it_is(
    queue_name: str, admin: Admin, arguments: dict[str, object], make_settings: MakeSettings
) -> None:
    admin.declare(queue_name, arguments=arguments)
    admin.publish(queue_name, [b"a", b"b"])
    seen: list[bytes] = []
    app = App()

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        seen.append(message.body)

    async with Worker(app, make_settings()) as worker:
        await eventually(lambda: worker.stats.acked == 2, what="2 acks")
    assert sorted(seen) == [b"a", b"b"]


async def test_a_missing_queue_is_declared_durable_and_bound_to_the_seed_topic_exchange(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    exchange = f"{queue_name}-exchange"
    seen: list[object] = []
    app = App()

    @app.consumer(
        queue_name, exchange=exchange, routing_key="purchasing.system.contract", decode="json"
    )
    async def handle(message: Message) -> None:
        seen.append((message.routing_key, message.payload))

    try:
        async with Worker(app, make_settings()) as worker:
            for key in ("purchasing.system.contract", "purchasing.system.other"):
                await admin.run(
                    admin.publish, queue_name, [json.dumps({"key": key}).encode()],
                    exchange=exchange, routing_key=key,
                )
            await eventually(lambda: worker.stats.acked == 1, what="1 ack")
    finally:
        admin.delete_exchange(exchange)
    assert seen == [("purchasing.system.contract", {"key": "purchasing.system.contract"})]
    with pika.BlockingConnection(pika.URLParameters(MAIN_URL)) as connection:
        declared = connection.channel().queue_declare(queue_name, passive=True)
        assert declared.method.message_count == 0


async def test_graceful_stop_finishes_running_handlers_and_requeues_unstarted(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    admin.publish(queue_name, [str(i).encode() for i in range(6)])
    started = threading.Semaphore(0)
    release = threading.Event()
    finished: list[bytes] = []
    app = App()

    @app.consumer(queue_name, concurrency=2, prefetch=4)
    def handle(message: Message) -> None:
        started.release()
        release.wait(30)
        finished.append(message.body)

    worker = Worker(app, make_settings(grace_period=10))
    await worker.start()
    for _ in range(2):
        assert await asyncio.to_thread(started.acquire, True, 10)
    await eventually(lambda: worker.stats.delivered == 4, what="4 prefetched deliveries")
    stopping = asyncio.ensure_future(worker.stop())
    # The unstarted two go back at once, while the running two are still running.
    await eventually(lambda: worker.stats.requeued_unstarted == 2, what="the requeue")
    assert worker.in_flight == 2
    release.set()
    graceful = await stopping
    assert graceful
    assert len(finished) == 2
    assert worker.stats.acked == 2
    assert worker.stats.requeued_unstarted == 2
    # The two finished ones are acked; the four others are back, nothing lost, nothing doubled.
    remaining = {body for _, body in admin.drain(queue_name)}
    assert remaining | set(finished) == {str(i).encode() for i in range(6)}
    assert len(remaining) == 4


async def test_a_handler_still_running_after_the_grace_period_is_redelivered(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    admin.publish(queue_name, [b"too slow"])
    entered = asyncio.Event()
    app = App()

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        entered.set()
        await asyncio.sleep(60)

    worker = Worker(app, make_settings(grace_period=0.5))
    await worker.start()
    await asyncio.wait_for(entered.wait(), 10)
    assert await worker.stop() is False
    assert admin.counts(queue_name) == (1, 0)


async def test_several_urls_are_tried_in_turn(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    admin.publish(queue_name, [b"x"])
    app = App()

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        pass

    dead = "amqp://guest:guest@127.0.0.1:1/%2F"
    async with Worker(app, make_settings(urls=(dead, MAIN_URL))) as worker:
        await eventually(lambda: worker.stats.acked == 1, what="the ack")


async def test_wrong_credentials_stop_at_once_with_a_clear_error(
    queue_name: str, make_settings: MakeSettings
) -> None:
    app = App()
    app.add_consumer(lambda message: None, queue_name)
    bad = "amqp://guest:not-the-password-42@127.0.0.1:5672/%2F"

    began = time.monotonic()
    with pytest.raises(AuthenticationError) as info:
        await Worker(app, make_settings(urls=(bad,), connect_timeout=30)).start()
    assert time.monotonic() - began < 10, "a permanent error must not be retried"
    assert "guest" in str(info.value)
    assert "not-the-password-42" not in str(info.value)


async def test_unknown_vhost_is_a_permanent_error(
    queue_name: str, make_settings: MakeSettings
) -> None:
    app = App()
    app.add_consumer(lambda message: None, queue_name)

    url = "amqp://guest:guest@127.0.0.1:5672/no-such-vhost"
    with pytest.raises(Exception, match="virtual host 'no-such-vhost'"):
        await Worker(app, make_settings(urls=(url,), connect_timeout=30)).start()


async def test_an_unreachable_broker_gives_up_after_the_first_connection_budget(
    queue_name: str,
    make_settings: MakeSettings,
) -> None:
    app = App()
    app.add_consumer(lambda message: None, queue_name)

    url = "amqp://guest:guest@127.0.0.1:1/%2F"
    began = time.monotonic()
    with pytest.raises(BrokerUnreachableError, match="no broker answered within 2 s"):
        await Worker(app, make_settings(urls=(url,), connect_timeout=2)).start()
    assert 2 <= time.monotonic() - began < 10


async def test_consumer_cancelled_by_the_broker_resumes(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    """Deleting the queue sends basic.cancel; the consumer re-declares and re-subscribes."""
    admin.declare(queue_name)
    seen: list[bytes] = []
    settled = Settled()
    app = App(middleware=[settled])

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        seen.append(message.body)

    async with Worker(app, make_settings()) as worker:
        await admin.run(admin.publish, queue_name, [b"before"])
        await settled.wait_for(1)
        await admin.run(admin.delete, queue_name)
        await eventually(lambda: worker.stats.consumer_cancels == 1, what="the cancel")
        await admin.run(admin.declare, queue_name)
        await eventually(lambda: worker.ready, what="re-subscription")
        await admin.run(admin.publish, queue_name, [b"after"])
        await settled.wait_for(2)
    assert seen == [b"before", b"after"]
    assert worker.stats.acked == 2
    assert worker.stats.reconnect_count == 0


async def test_coalesced_acks_never_cover_a_running_message_nor_wait_for_it(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    """Tags 2 and 3 finish while tag 1 still runs: their acks go out at once, one by one (a
    multiple=True ack up to 3 would also ack the unfinished 1)."""
    admin.declare(queue_name)
    admin.publish(queue_name, [b"slow", b"quick 1", b"quick 2"])
    release = asyncio.Event()
    app = App()

    @app.consumer(queue_name, concurrency=3)
    async def handle(message: Message) -> None:
        if message.body == b"slow":
            await release.wait()

    def unacked() -> int:
        listing = main_broker_ctl(
            "list_queues", "name", "messages_unacknowledged", "--no-table-headers", "--quiet"
        )
        for line in listing.splitlines():
            name, _, count = line.strip().rpartition("\t")
            if name == queue_name:
                return int(count)
        raise AssertionError(f"{queue_name} not listed")

    async with Worker(app, make_settings()) as worker:
        await eventually(lambda: worker.stats.acked == 2, what="the two quick acks")
        assert worker.in_flight == 1
        assert await asyncio.to_thread(unacked) == 1, "only the running one is unacked"
        release.set()
        await eventually(lambda: worker.stats.acked == 3, what="the last ack")
    assert admin.counts(queue_name) == (0, 0)


async def test_several_routing_keys_fanout_and_headers_exchanges_are_bound(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    """Issue 8.7: ``routing_key=[...]`` crashed the worker with pika tracebacks. Now each key is
    bound; a fanout exchange binds without a key, a headers exchange with bind arguments."""
    topic, fanout, headers = (f"{queue_name}-{kind}" for kind in ("topic", "fanout", "headers"))
    queues = {kind: f"{queue_name}-{kind}" for kind in ("topic", "fanout", "headers")}
    app = App()
    seen: dict[str, list[bytes]] = {kind: [] for kind in queues}

    def record(kind: str) -> Callable[[Message], Awaitable[None]]:
        async def handle(message: Message) -> None:
            seen[kind].append(message.body)

        return handle

    app.add_consumer(
        record("topic"), queues["topic"], exchange=topic, routing_key=["order.created", "bill.*"]
    )
    app.add_consumer(record("fanout"), queues["fanout"], exchange=fanout, exchange_type="fanout")
    app.add_consumer(
        record("headers"), queues["headers"], exchange=headers, exchange_type="headers",
        bind_arguments={"x-match": "all", "kind": "order"},
    )

    def publish(exchange: str, key: str, body: bytes, **headers: str) -> None:
        admin.publish(
            "", [body], exchange=exchange, routing_key=key,
            properties=pika.BasicProperties(delivery_mode=2, headers=headers or None),
        )

    try:
        async with Worker(app, make_settings()) as worker:
            await admin.run(publish, topic, "order.created", b"t1")
            await admin.run(publish, topic, "bill.sent", b"t2")
            await admin.run(publish, topic, "other.key", b"not routed")
            await admin.run(publish, fanout, "anything", b"f1")
            await admin.run(publish, headers, "", b"h1", kind="order")
            await admin.run(publish, headers, "", b"not matched", kind="bill")
            await eventually(lambda: worker.stats.acked == 4, what="four messages")
            await asyncio.sleep(0.3)
        assert sorted(seen["topic"]) == [b"t1", b"t2"]
        assert seen["fanout"] == [b"f1"]
        assert seen["headers"] == [b"h1"]
    finally:
        admin.delete(*queues.values(), *(f"{q}.dlq" for q in queues.values()))
        for exchange in (topic, fanout, headers):
            admin.delete_exchange(exchange)


@given(
    routing_key=st.one_of(
        st.none(),
        st.text(max_size=5),
        st.lists(st.text(max_size=5), max_size=3),
        st.lists(st.one_of(st.integers(), st.none(), st.binary(max_size=3)), min_size=1),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
        st.integers(),
        st.binary(max_size=5),
    ),
    exchange_type=st.sampled_from(["topic", "direct", "fanout", "headers"]),
    bind_arguments=st.one_of(st.none(), st.just({"x-match": "any", "k": "v"})),
)
def test_any_routing_key_value_is_accepted_or_refused_in_one_sentence(
    routing_key: object, exchange_type: str, bind_arguments: dict[str, str] | None
) -> None:
    """Registration either accepts the binding or raises ConfigurationError with one line."""
    app = App()
    try:
        spec = app.add_consumer(
            lambda message: None, "q", exchange="x", exchange_type=exchange_type,
            routing_key=routing_key,  # type: ignore[arg-type]
            bind_arguments=bind_arguments,
        )
    except ConfigurationError as exc:
        refusal = str(exc)
        assert "\n" not in refusal
        return
    assert spec.routing_keys
    assert all(isinstance(key, str) for key in spec.routing_keys)


async def test_abort_starts_no_prefetched_message(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    """Issue 8.9: after Worker.abort() (a fatal error, or leaving ``async with`` by an
    exception) prefetched messages still started, ran, and ran again after redelivery."""
    admin.declare(queue_name)
    admin.publish(queue_name, [b"1", b"2", b"3"])
    app = App()
    started: list[bytes] = []

    @app.consumer(queue_name, concurrency=1, prefetch=3)
    async def handle(message: Message) -> None:
        started.append(message.body)
        await asyncio.Event().wait()  # runs until cancelled

    with contextlib.suppress(RuntimeError):
        async with Worker(app, make_settings()) as worker:
            await eventually(lambda: worker.consumers[0].waiting == 2, what="two prefetched")
            raise RuntimeError("leaving the block by an exception aborts")
    await asyncio.sleep(0.5)  # a prefetched message would have started by now
    assert started == [b"1"]
    assert admin.counts(queue_name) == (3, 0)


async def test_a_handler_reads_steadyrabbits_own_properties_not_pikas(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    """Issue 9.4: the public Message exposes steadyrabbit's Properties value."""
    from steadyrabbit import Properties

    admin.declare(queue_name)
    app = App()
    seen: list[Properties] = []

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        seen.append(message.properties)

    sent = pika.BasicProperties(
        delivery_mode=2, content_type="application/json", correlation_id="c-1", priority=3,
        headers={"x-user": "kept"}, timestamp=1_700_000_000, app_id="billing",
    )

    async with Worker(app, make_settings()) as worker:
        await admin.run(admin.publish, queue_name, [b"{}"], properties=sent)
        await eventually(lambda: worker.stats.acked == 1, what="the ack")
    [properties] = seen
    assert type(properties) is Properties
    assert properties == Properties(
        content_type="application/json", headers={"x-user": "kept"}, delivery_mode=2,
        priority=3, correlation_id="c-1", timestamp=1_700_000_000, app_id="billing",
    )
