"""Fixtures: the machine's broker, a private broker node, unique queues, an admin client,
worker settings, and a middleware that says when messages have been settled.

Async tests run under anyio's pytest plugin (``pytestmark = pytest.mark.anyio``, asyncio
backend): a test is ``async def`` and awaits the worker itself, no ``asyncio.run`` of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pika
import pika.exceptions
import pytest

from steadyrabbit import Decision, Message, Middleware, Outcome, Settings
from steadyrabbit.testing import Cluster, start_cluster
from tests._broker import BrokerNode, main_broker_ctl, start_node
from tests._tls import CLIENT_NAME, Pki, make_pki, tls_conf

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


class MakeSettings(Protocol):
    def __call__(self, url: str = ..., **overrides: Any) -> Settings: ...


@pytest.fixture
def make_settings(tmp_path: Path) -> MakeSettings:
    """Settings for a worker under test: the machine's broker (or ``url``), a 10 s connection
    budget, state (the crash-loop record) under ``tmp_path``; keyword arguments override."""

    def make(url: str = MAIN_URL, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "urls": (url,),
            "connect_timeout": 10.0,
            "state_dir": tmp_path / "state",
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def named_settings(make_settings: MakeSettings) -> MakeSettings:
    """``make_settings`` with a worker name of its own (a test finds the worker's connections
    on the broker by it) and reconnects from 0.2 s up to 1 s."""

    def make(url: str = MAIN_URL, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "name": f"sr-test-{uuid.uuid4().hex[:8]}",
            "reconnect_delay": 0.2,
            "reconnect_delay_max": 1.0,
        }
        values.update(overrides)
        return make_settings(url, **values)

    return make


@pytest.fixture
def metrics_settings(make_settings: MakeSettings) -> MakeSettings:
    """``make_settings`` with the metrics endpoint on a free port."""

    def make(url: str = MAIN_URL, **overrides: Any) -> Settings:
        return make_settings(url, **{"metrics_port": 0, **overrides})

    return make


@pytest.fixture
def node_settings(make_settings: MakeSettings, private_node: BrokerNode) -> MakeSettings:
    """Settings for a worker on the private node, which tests restart and cut: heartbeat 5 s,
    reconnects from 0.2 s up to 2 s; keyword arguments override."""

    def make(url: str = private_node.url, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "heartbeat": 5,
            "reconnect_delay": 0.2,
            "reconnect_delay_max": 2.0,
        }
        values.update(overrides)
        return make_settings(url, **values)

    return make


class Settled(Middleware):
    """Records every message's decision; ``await settled.wait_for(n)`` returns once ``n``
    messages (of ``outcome``, if given) have been settled: woken by ``on_settled``, no polling.

    ``on_settled`` runs after the ack (or the confirmed copy and the ack), once the worker's
    counters have been updated.
    """

    def __init__(self) -> None:
        self.decisions: list[tuple[bytes, Decision]] = []
        self._changed = asyncio.Event()

    def on_settled(self, message: Message, decision: Decision) -> None:
        self.decisions.append((message.body, decision))
        self._changed.set()

    def count(self, outcome: Outcome | None = None) -> int:
        return sum(1 for _, d in self.decisions if outcome is None or d.outcome is outcome)

    async def wait_for(
        self, n: int, outcome: Outcome | None = None, *, within: float = 30
    ) -> None:
        what = f"{n} {outcome.value if outcome else 'settled'} message(s)"
        deadline = time.monotonic() + within
        while self.count(outcome) < n:
            self._changed.clear()
            remaining = deadline - time.monotonic()
            try:
                await asyncio.wait_for(self._changed.wait(), max(remaining, 0))
            except TimeoutError:
                raise AssertionError(
                    f"timed out after {within} s waiting for {what}; settled: "
                    f"{[(body, d.outcome.value) for body, d in self.decisions]}"
                ) from None


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


@dataclass(frozen=True)
class TlsListener:
    """The private node's TLS listener (``amqps://localhost:port``) and the PKI behind it."""

    port: int
    pki: Pki

    def url(self, query: str = "", *, host: str = "localhost", user: str = "guest:guest") -> str:
        return f"amqps://{user}@{host}:{self.port}/%2F" + (f"?{query}" if query else "")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), key_password="Open-Sesame-8472")


@pytest.fixture(scope="session")
def _tls_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def private_node(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki, _tls_port: int
) -> Iterator[BrokerNode]:
    """A private broker node: consumer_timeout 5 s, checked every second (channel tick), with
    the management plugin (doctor reads it), and a TLS listener (see :func:`tls_listener`)."""
    base: Path = tmp_path_factory.mktemp("rabbit")
    node = start_node(
        base,
        consumer_timeout_ms=5000,
        channel_tick_interval_ms=1000,
        plugins=["rabbitmq_management", "rabbitmq_auth_mechanism_ssl"],
        extra_conf=tls_conf(pki, _tls_port),
    )
    try:
        # The client certificate's common name logs in with EXTERNAL, without a password.
        node.ctl("add_user", CLIENT_NAME, secrets.token_hex(16))
        node.ctl("clear_password", CLIENT_NAME)
        node.ctl("set_permissions", "-p", "/", CLIENT_NAME, ".*", ".*", ".*")
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="session")
def tls_listener(private_node: BrokerNode, pki: Pki, _tls_port: int) -> TlsListener:
    return TlsListener(_tls_port, pki)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three private nodes joined into one cluster, shared by the whole run; a test that
    stops or kills a node starts it again before it ends. With the management plugin: doctor
    reads the members and the queues' replicas from it."""
    with start_cluster(
        tmp_path_factory.mktemp("cluster"), 3, plugins=["rabbitmq_management"]
    ) as nodes:
        yield nodes


@pytest.fixture
def private_admin(private_node: BrokerNode) -> Admin:
    return Admin(private_node.url)
