"""Publishing, on the real broker: confirmed, mandatory, delayed, through reconnects and alarms,
from async code, from threads and from handlers."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid
from collections import Counter
from datetime import timedelta
from typing import Any

import pika
import pytest

from steadyrabbit import (
    App,
    BlockingPublisher,
    BrokerUnreachableError,
    ClosedByUserError,
    ConfigurationError,
    Message,
    Middleware,
    PayloadError,
    Publish,
    Publisher,
    PublishTimeoutError,
    UnroutableError,
    Worker,
)
from steadyrabbit._middleware import PublishNext
from steadyrabbit._topology import delay_queue
from steadyrabbit.testing import BrokerNode
from tests.conftest import Admin, MakeSettings, eventually

pytestmark = pytest.mark.anyio


@dataclasses.dataclass
class Invoice:
    order: str
    total: float


def declare_topic(admin: Admin, exchange: str, queue: str, binding: str) -> None:
    with admin._connection() as connection:
        channel = connection.channel()
        channel.exchange_declare(exchange, "topic", durable=True)
        channel.queue_declare(queue, durable=True)
        channel.queue_bind(queue, exchange, binding)


async def test_a_publish_is_confirmed_with_an_id_a_content_type_and_persistence(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    async with Publisher(make_settings()) as publisher:
        made = await publisher.publish({"id": 1}, routing_key=queue_name)
        given = await publisher.publish(
            Invoice("o-1", 9.5), routing_key=queue_name, message_id="m-2", headers={"x-a": "b"}
        )
        text = await publisher.publish("héllo", routing_key=queue_name, persistent=False)
    # Confirmed means enqueued: the queue holds them now, without waiting.
    (p1, b1), (p2, b2), (p3, b3) = admin.drain(queue_name)
    assert (b1, p1.content_type, p1.message_id, p1.delivery_mode) == (
        b'{"id":1}', "application/json", made, 2
    )
    assert len(made) == 32
    assert given == "m-2"
    assert (b2, p2.message_id, p2.headers) == (b'{"order":"o-1","total":9.5}', "m-2", {"x-a": "b"})
    assert (b3.decode(), p3.content_type, p3.delivery_mode) == (
        "héllo", "text/plain; charset=utf-8", 1
    )
    assert text == p3.message_id


async def test_an_unroutable_publish_raises_and_the_publisher_goes_on(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    exchange = f"{queue_name}.x"
    declare_topic(admin, exchange, queue_name, "orders.*")
    try:
        async with Publisher(make_settings()) as publisher:
            with pytest.raises(UnroutableError, match="NO_ROUTE"):
                await publisher.publish(b"lost?", exchange=exchange, routing_key="nobody.home")
            with pytest.raises(UnroutableError, match="does not exist"):
                await publisher.publish(b"lost?", exchange=f"{exchange}.gone", routing_key="a")
            with pytest.raises(UnroutableError, match="NO_ROUTE"):
                await publisher.publish(b"lost?", routing_key=f"{queue_name}.no-such-queue")
            # The closed channel is replaced: the next publish goes through.
            await publisher.publish(b"kept", exchange=exchange, routing_key="orders.new")
        assert [body for _, body in admin.drain(queue_name)] == [b"kept"]
    finally:
        admin.delete_exchange(exchange)


async def test_bad_arguments_and_bodies_are_one_sentence_and_nothing_is_sent(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    async with Publisher(make_settings()) as publisher:
        with pytest.raises(PayloadError, match="cannot encode a dict body as JSON"):
            await publisher.publish({"when": object()}, routing_key=queue_name)
        with pytest.raises(PayloadError, match="not as 'text/csv'"):
            await publisher.publish({"a": 1}, routing_key=queue_name, content_type="text/csv")
        with pytest.raises(ConfigurationError, match="delay must be"):
            await publisher.publish(b"x", routing_key=queue_name, delay=-1)
        with pytest.raises(ConfigurationError, match="routing_key must be a string"):
            await publisher.publish(b"x", routing_key=7)  # type: ignore[arg-type]
    assert admin.counts(queue_name) == (0, 0)
    with pytest.raises(ClosedByUserError, match="not open"):
        await publisher.publish(b"x", routing_key=queue_name)
    with pytest.raises(ConfigurationError, match="timeout"):
        Publisher(make_settings(), timeout=0)


async def test_no_broker_is_one_sentence_within_the_connect_timeout(
    make_settings: MakeSettings,
) -> None:
    started = time.monotonic()
    with pytest.raises(BrokerUnreachableError, match="no broker answered"):
        async with Publisher(make_settings("amqp://guest:guest@127.0.0.1:1/", connect_timeout=1)):
            pass
    assert time.monotonic() - started < 10


async def test_a_delayed_publish_arrives_after_its_delay_by_its_exchange_and_key(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    exchange = f"{queue_name}.x"
    declare_topic(admin, exchange, queue_name, "orders.#")
    try:
        async with Publisher(make_settings()) as publisher:
            sent = time.monotonic()
            await publisher.publish(
                b"later", exchange=exchange, routing_key="orders.eu.new", delay=1.5
            )
            await publisher.publish(b"direct", routing_key=queue_name, delay=timedelta(seconds=1))
            assert admin.counts(queue_name) == (0, 0)
            with pytest.raises(UnroutableError, match="does not exist"):
                await publisher.publish(b"x", routing_key=f"{queue_name}.missing", delay=1)
        arrived: list[tuple[float, Any, bytes]] = []

        def both_arrived() -> bool:
            arrived.extend((time.monotonic() - sent, p, b) for p, b in admin.drain(queue_name))
            return len(arrived) == 2

        await eventually(both_arrived, within=15, what="the delayed messages")
        by_body = {body: (after, properties) for after, properties, body in arrived}
        assert by_body[b"direct"][0] >= 0.9
        assert by_body[b"later"][0] >= 1.4
        # Delivered as published: to the exchange, with the routing key (a topic binding).
        later = by_body[b"later"][1]
        assert later.headers["x-death"][0]["routing-keys"] == ["orders.eu.new"]
    finally:
        admin.delete_exchange(exchange)
        admin.delete(delay_queue(exchange, 1500).name, delay_queue("", 1000).name)


@pytest.mark.slow
@pytest.mark.private_node
async def test_ten_thousand_publishes_through_a_connection_kill_lose_nothing(
    private_node: BrokerNode, private_admin: Admin, make_settings: MakeSettings
) -> None:
    """Issue 11: 10,000 confirmed publishes with ``rabbitmqctl close_all_connections`` in the
    middle (on a private node: the main broker's connections are other tests' too) arrive,
    none lost; duplicates (a publish whose confirm died with its connection) are counted."""
    queue = f"publish-kill-{uuid.uuid4().hex[:6]}"
    private_admin.declare(queue)
    total = 10_000
    reconnects: list[str] = []

    class Reconnects(Middleware):
        def on_reconnecting(self, role: str, cause: str, error: Exception) -> None:
            reconnects.append(cause)

    settings = make_settings(private_node.url, reconnect_delay=0.1, reconnect_delay_max=0.5)
    try:
        async with Publisher(settings, middleware=[Reconnects()]) as pub:

            async def publish(n: int) -> None:
                await pub.publish(str(n).encode(), routing_key=queue, message_id=f"n-{n}")

            for start in range(0, total, 500):
                if start == total // 2:
                    killing = asyncio.ensure_future(
                        asyncio.to_thread(
                            private_node.ctl, "close_all_connections", "steadyrabbit test kill"
                        )
                    )
                await asyncio.gather(*(publish(n) for n in range(start, start + 500)))
            await killing
        assert reconnects, "the kill did not reach the publisher"
        received: Counter[str] = Counter()

        def all_arrived() -> bool:
            received.update(str(p.message_id) for p, _ in private_admin.drain(queue))
            return len(received) >= total

        await eventually(all_arrived, within=60, what="every message")
        assert set(received) == {f"n-{n}" for n in range(total)}
        duplicates = sum(received.values()) - total
        print(f"10,000 publishes through close_all_connections: {duplicates} duplicates")
    finally:
        private_admin.delete(queue)


async def test_a_handler_publishes_on_the_workers_connection_before_its_ack(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    downstream = f"{queue_name}.out"
    admin.declare(queue_name)
    admin.declare(downstream)
    seen: list[Publish] = []

    class Watch(Middleware):
        async def around_publish(self, publish: Publish, call_next: PublishNext) -> None:
            seen.append(publish)
            await call_next(publish)

    app = App(middleware=[Watch()])
    done = asyncio.Event()

    @app.consumer(queue_name, decode="json")
    async def forward(message: Message) -> None:
        await message.publisher.publish(
            {"seen": message.payload["n"]}, routing_key=downstream, message_id=message.message_id
        )

    @app.consumer(downstream, decode="json")
    def sink(message: Message) -> None:
        if message.payload["seen"] == 3:
            message.blocking_publisher.publish({"seen": "thread"}, routing_key=downstream)
        if message.payload["seen"] == "thread":
            done.set()

    try:
        async with Worker(app, make_settings()):
            await admin.run(
                admin.publish,
                queue_name,
                [b'{"n": 1}', b'{"n": 2}', b'{"n": 3}'],
                properties=pika.BasicProperties(message_id="in-1"),
            )
            await asyncio.wait_for(done.wait(), 20)
    finally:
        admin.delete(downstream, f"{downstream}.dlq")
    user_publishes = [p for p in seen if not p.copy]
    assert [p.routing_key for p in user_publishes] == [downstream] * 4
    assert user_publishes[0].message_id == "in-1"


async def test_blocking_publishers_from_many_threads(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    admin.declare(queue_name)

    def publish_from_threads() -> list[str]:
        ids: list[str] = []
        with BlockingPublisher(make_settings()) as publisher:

            def send(n: int) -> None:
                for i in range(50):
                    ids.append(publisher.publish({"t": n, "i": i}, routing_key=queue_name))

            threads = [threading.Thread(target=send, args=(n,)) for n in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        with pytest.raises(ClosedByUserError):
            publisher.publish(b"after close", routing_key=queue_name)
        return ids

    ids = await asyncio.to_thread(publish_from_threads)
    assert len(set(ids)) == 200
    assert admin.counts(queue_name) == (200, 0)


@pytest.mark.private_node
async def test_a_memory_alarm_is_a_clear_timeout_not_a_hang(
    private_node: BrokerNode, private_admin: Admin, make_settings: MakeSettings
) -> None:
    queue = f"alarm-pub-{uuid.uuid4().hex[:6]}"
    private_admin.declare(queue)
    try:
        async with Publisher(make_settings(private_node.url), timeout=2) as publisher:
            await publisher.publish(b"before", routing_key=queue)
            await asyncio.to_thread(private_node.ctl, "set_vm_memory_high_watermark", "0.000001")
            try:
                started = time.monotonic()
                with pytest.raises(PublishTimeoutError, match="memory or disk alarm"):
                    await publisher.publish(b"during", routing_key=queue, message_id="d-1")
                assert 1.9 < time.monotonic() - started < 5
            finally:
                await asyncio.to_thread(private_node.ctl, "set_vm_memory_high_watermark", "0.4")
            await publisher.publish(b"after", routing_key=queue)
        # The timed-out publish was held, not refused: it arrives once the alarm clears.
        await eventually(lambda: private_admin.counts(queue)[0] == 3, what="all three")
    finally:
        private_admin.delete(queue)
