"""Fixtures: the machine's broker, a private broker node, unique queues, an admin client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest

from tests._broker import BrokerNode, main_broker_ctl, start_node

MAIN_URL = os.environ.get("STEADYRABBIT_TEST_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
# Queues of this test session start with this, so that its clean-up never touches another's.
SESSION_PREFIX = f"sr-test-{uuid.uuid4().hex[:6]}-"


class Admin:
    """Blocking broker operations for test setup and checks, on a fresh connection each time.

    A fresh connection survives close_all_connections and restarts; call from a thread
    (``await admin.run(...)``) while a worker's event loop is running.
    """

    def __init__(self, url: str) -> None:
        self.url = url

    def _connection(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(pika.URLParameters(self.url))

    def declare(self, queue: str, arguments: dict[str, Any] | None = None) -> None:
        with self._connection() as connection:
            connection.channel().queue_declare(queue, durable=True, arguments=arguments)

    def publish(
        self,
        queue: str,
        bodies: list[bytes],
        *,
        exchange: str = "",
        routing_key: str | None = None,
        properties: pika.BasicProperties | None = None,
    ) -> None:
        props = properties or pika.BasicProperties(delivery_mode=2)
        with self._connection() as connection:
            channel = connection.channel()
            channel.confirm_delivery()
            for body in bodies:
                channel.basic_publish(exchange, routing_key or queue, body, props)

    def counts(self, queue: str) -> tuple[int, int]:
        """(messages ready, consumers) as the broker reports them; unacked ones are not counted."""
        with self._connection() as connection:
            method = connection.channel().queue_declare(queue, passive=True).method
            return method.message_count, method.consumer_count

    def drain(self, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
        """Take every ready message off ``queue`` (acked)."""
        taken: list[tuple[pika.BasicProperties, bytes]] = []
        with self._connection() as connection:
            channel = connection.channel()
            while True:
                method, properties, body = channel.basic_get(queue, auto_ack=True)
                if method is None or properties is None or body is None:
                    return taken
                taken.append((properties, body))

    def delete(self, *queues: str) -> None:
        with self._connection() as connection:
            channel = connection.channel()
            for queue in queues:
                channel.queue_delete(queue)

    def delete_exchange(self, exchange: str) -> None:
        with self._connection() as connection:
            connection.channel().exchange_delete(exchange)

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    *,
    within: float = 30,
    what: str = "condition",
) -> None:
    """Wait for a condition that lives outside this process (broker state, a subprocess).

    In-process progress uses events instead; this is for what can only be observed by asking.
    """
    deadline = time.monotonic() + within
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
def admin() -> Admin:
    return Admin(MAIN_URL)


@pytest.fixture
def queue_name(request: pytest.FixtureRequest) -> Iterator[str]:
    """A unique durable-queue name on the main broker; the queue and its .dlq are deleted after."""
    name = f"{SESSION_PREFIX}{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
    yield name
    with contextlib.suppress(pika.exceptions.AMQPError):
        Admin(MAIN_URL).delete(name, f"{name}.dlq")


@pytest.fixture(scope="session", autouse=True)
def _sweep_test_queues() -> Iterator[None]:
    """Delete this session's queues left on the main broker (retry queues have per-test names
    the fixtures cannot guess)."""
    yield
    if MAIN_URL != "amqp://guest:guest@127.0.0.1:5672/%2F":
        return  # listing queues needs rabbitmqctl on the machine's own broker
    with contextlib.suppress(RuntimeError, OSError, pika.exceptions.AMQPError):
        listing = main_broker_ctl("list_queues", "name", "--no-table-headers", "--quiet")
        names = [n.strip() for n in listing.splitlines() if n.strip().startswith(SESSION_PREFIX)]
        if names:
            Admin(MAIN_URL).delete(*names)


@pytest.fixture(scope="session")
def private_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerNode]:
    """A private broker node: consumer_timeout 5 s, checked every second (channel tick), with
    the management plugin (doctor reads it)."""
    base: Path = tmp_path_factory.mktemp("rabbit")
    node = start_node(
        base,
        consumer_timeout_ms=5000,
        channel_tick_interval_ms=1000,
        plugins=["rabbitmq_management"],
    )
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def private_admin(private_node: BrokerNode) -> Admin:
    return Admin(private_node.url)
