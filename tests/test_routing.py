"""Routing that real topologies need, on the real broker: exchange-to-exchange bindings (declared
again after recovery), single-active-consumer and consumer priorities."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from steadyrabbit import (
    App,
    ConfigurationError,
    Message,
    Middleware,
    TopologyConflictError,
    Worker,
)
from tests._broker import close_connections_of
from tests.conftest import Admin, MakeSettings, Settled, eventually

pytestmark = pytest.mark.anyio


def test_exchange_bindings_and_consumer_options_are_checked_at_registration() -> None:
    app = App()
    with pytest.raises(ConfigurationError, match="default exchange cannot be bound"):
        app.bind_exchange("", "orders", routing_key="#")
    with pytest.raises(ConfigurationError, match="cannot be bound to itself"):
        app.bind_exchange("orders", "orders", routing_key="#")
    with pytest.raises(ConfigurationError, match="needs a routing key"):
        app.bind_exchange("events", "orders")
    with pytest.raises(ConfigurationError, match="ignores routing keys"):
        app.bind_exchange("fan", "orders", source_type="fanout", routing_key="x")
    with pytest.raises(ConfigurationError, match="unknown exchange type 'fast'"):
        app.bind_exchange("events", "orders", routing_key="#", destination_type="fast")
    with pytest.raises(ConfigurationError, match="priority for 'q' must be a whole number"):
        app.add_consumer(lambda m: None, "q", priority=1.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="single_active for 'q'"):
        app.add_consumer(lambda m: None, "q", single_active="yes")  # type: ignore[arg-type]
    binding = app.bind_exchange("events", "orders", routing_key=["order.*", "refund.*"])
    assert binding.routing_keys == ("order.*", "refund.*")
    assert app.exchange_bindings == (binding,)


class Recovered(Middleware):
    """Set once the consuming connection is open again."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()

    def on_connected(self, role: str, address: Any) -> None:
        if role == "consume":
            self.connected.set()


@pytest.mark.slow
async def test_an_exchange_binding_routes_and_is_declared_again_after_recovery(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    events, orders = f"{queue_name}.events", f"{queue_name}.orders"
    settled, recovered = Settled(), Recovered()
    app = App(middleware=[recovered])
    app.bind_exchange(events, orders, routing_key="order.#")
    bodies: list[bytes] = []

    @app.consumer(queue_name, exchange=orders, routing_key="#", middleware=[settled])
    async def handle(message: Message) -> None:
        bodies.append(message.body)

    def publish(body: bytes, routing_key: str) -> None:
        admin.publish("", [body], exchange=events, routing_key=routing_key)

    try:
        async with Worker(app, make_settings(reconnect_delay=0.1)):
            await admin.run(publish, b"routed", "order.eu")
            await admin.run(publish, b"not routed", "invoice.eu")
            await settled.wait_for(1)
            # Someone removes the binding; the reconnect declares it again.
            with admin._connection() as connection:
                connection.channel().exchange_unbind(orders, events, "order.#")
            recovered.connected.clear()
            assert await asyncio.to_thread(close_connections_of, os.getpid(), "test") >= 1
            await asyncio.wait_for(recovered.connected.wait(), 20)
            # The consumer subscribes last, after the bindings.
            await eventually(lambda: admin.counts(queue_name)[1] == 1, what="the consumer")
            await admin.run(publish, b"after", "order.us")
            await settled.wait_for(2)
        assert bodies == [b"routed", b"after"]
    finally:
        admin.delete_exchange(events)
        admin.delete_exchange(orders)


@pytest.mark.slow
async def test_single_active_consumer_delivers_to_one_worker_and_conflicts_are_one_sentence(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    received: dict[str, list[bytes]] = {"first": [], "second": []}
    settled = Settled()

    def app_for(name: str) -> App:
        app = App(middleware=[settled])

        @app.consumer(queue_name, single_active=True, concurrency=4)
        async def handle(message: Message) -> None:
            received[name].append(message.body)

        return app

    async with Worker(app_for("first"), make_settings()), Worker(
        app_for("second"), make_settings()
    ):
        assert admin.counts(queue_name)[1] == 2  # both subscribed
        await admin.run(admin.publish, queue_name, [b"%d" % n for n in range(20)])
        await settled.wait_for(20)
    assert len(received["first"]) == 20
    assert received["second"] == []

    plain = f"{queue_name}-plain"
    admin.declare(plain)
    app = App()
    app.add_consumer(lambda m: None, plain, single_active=True)
    try:
        with pytest.raises(TopologyConflictError, match="exists without single-active-consumer"):
            async with Worker(app, make_settings(connect_timeout=5)):
                pass
    finally:
        admin.delete(plain, f"{plain}.dlq")


@pytest.mark.slow
async def test_the_higher_priority_consumer_gets_the_messages_while_it_has_room(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    received: dict[str, int] = {"high": 0, "low": 0}
    settled = Settled()

    def app_for(name: str, priority: int) -> App:
        app = App(middleware=[settled])

        @app.consumer(queue_name, priority=priority, concurrency=20)
        async def handle(message: Message) -> None:
            received[name] += 1

        return app

    async with Worker(app_for("low", 0), make_settings()), Worker(
        app_for("high", 10), make_settings()
    ):
        await admin.run(admin.publish, queue_name, [b"%d" % n for n in range(20)])
        await settled.wait_for(20)
    assert received == {"high": 20, "low": 0}
