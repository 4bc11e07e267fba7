"""Recovery, on a private broker node with consumer_timeout 5 s checked every second.

The seed-1 incident, a channel closed by the broker, connections closed under running
handlers, and a broker restart.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest

from steadyrabbit import App, Message, RetryPolicy, Worker
from tests._broker import BrokerNode
from tests.conftest import Admin, MakeSettings, Settled, eventually

pytestmark = [pytest.mark.private_node, pytest.mark.anyio]


@pytest.fixture
def queue(private_admin: Admin, request: pytest.FixtureRequest) -> str:
    name = f"recovery-{request.node.name[:40]}"
    private_admin.delete(name, f"{name}.dlq")
    return name


@pytest.mark.slow  # waits out broker timeouts or processes: CI's slow pass
async def test_seed1_backlog_with_a_slow_handler_never_trips_consumer_timeout(
    private_node: BrokerNode, private_admin: Admin, queue: str, node_settings: MakeSettings
) -> None:
    """The seed's setup: durable queue on a topic exchange, JSON bodies, a slow call per message,
    a backlog. Unlimited prefetch would leave messages unacked past consumer_timeout (5 s);
    the default prefetch (= concurrency) keeps every delivery's unacked time at one call."""
    exchange = "DEFAULT_EXCHANGE"
    key = "purchasing.system.contract"
    calls: dict[int, int] = {}
    app = App()

    @app.consumer(queue, exchange=exchange, routing_key=key, decode="json")
    def report_contract(message: Message) -> None:
        number = message.payload["contract"]
        calls[number] = calls.get(number, 0) + 1
        time.sleep(2)  # the slow REST call

    bodies = [json.dumps({"contract": n}).encode() for n in range(20)]

    try:
        async with Worker(app, node_settings()) as worker:
            await private_admin.run(
                private_admin.publish, queue, bodies, exchange=exchange, routing_key=key
            )
            await eventually(lambda: worker.stats.acked == 20, within=80, what="20 acks")
    finally:
        private_admin.delete_exchange(exchange)
    assert calls == dict.fromkeys(range(20), 1), "every message handled exactly once"
    assert worker.stats.channel_recoveries == 0, "no channel closed by the broker"
    assert worker.stats.reconnect_count == 0
    assert private_admin.counts(queue) == (0, 0)


@pytest.mark.slow
async def test_prefetched_messages_that_age_toward_consumer_timeout_go_back_unstarted(
    private_node: BrokerNode, private_admin: Admin, queue: str, node_settings: MakeSettings
) -> None:
    """An explicit prefetch above the concurrency: messages waiting in this process are returned
    to the queue before they reach the broker's consumer_timeout, so no channel is closed."""
    private_admin.declare(queue)
    private_admin.publish(queue, [str(n).encode() for n in range(6)])
    calls: dict[bytes, int] = {}
    app = App()

    @app.consumer(queue, concurrency=1, prefetch=6)
    def handle(message: Message) -> None:
        calls[message.body] = calls.get(message.body, 0) + 1
        time.sleep(1.5)

    async with Worker(app, node_settings(consumer_timeout=5)) as worker:
        await eventually(lambda: worker.stats.acked == 6, within=60, what="6 acks")
    assert worker.stats.requeued_aged >= 1
    assert worker.stats.channel_recoveries == 0
    assert calls == {str(n).encode(): 1 for n in range(6)}


@pytest.mark.slow
async def test_a_channel_closed_by_consumer_timeout_is_reopened_and_the_late_ack_dropped(
    private_node: BrokerNode, private_admin: Admin, queue: str, node_settings: MakeSettings
) -> None:
    """A handler outruns consumer_timeout: the broker closes the channel with
    PRECONDITION_FAILED and requeues. The consumer reopens the channel on the same connection;
    the late ack for the dead channel's tag is dropped, never sent on the new channel."""
    private_admin.declare(queue)
    private_admin.publish(queue, [b"first", b"second"])
    attempts: list[tuple[bytes, bool]] = []
    app = App()

    @app.consumer(queue)
    def handle(message: Message) -> None:
        attempts.append((message.body, message.redelivered))
        if len(attempts) == 1:
            time.sleep(8)  # past the 5 s consumer_timeout

    async with Worker(app, node_settings()) as worker:
        await eventually(
            lambda: worker.stats.stale_settlements_dropped == 1, within=30, what="the drop"
        )
        await eventually(lambda: worker.stats.acked == 2, within=30, what="2 acks")
    assert worker.stats.channel_recoveries == 1
    assert worker.stats.reconnect_count == 0, "the connection itself stayed up"
    assert attempts[0] == (b"first", False)
    assert (b"first", True) in attempts[1:]
    assert private_admin.counts(queue) == (0, 0)


async def test_connections_closed_by_the_broker_under_running_handlers_recover(
    private_node: BrokerNode, private_admin: Admin, queue: str, node_settings: MakeSettings
) -> None:
    private_admin.declare(queue)
    bodies = [str(n).encode() for n in range(6)]
    private_admin.publish(queue, bodies)
    running = threading.Semaphore(0)
    release = threading.Event()
    done: list[bytes] = []
    app = App()

    @app.consumer(queue, concurrency=2)
    def handle(message: Message) -> None:
        running.release()
        release.wait(30)
        done.append(message.body)

    async with Worker(app, node_settings()) as worker:
        for _ in range(2):
            assert await asyncio.to_thread(running.acquire, True, 10)
        await asyncio.to_thread(private_node.close_all_connections, "test: forced")
        await eventually(lambda: worker.stats.reconnect_count >= 1, what="a reconnect")
        await eventually(lambda: worker.ready, what="recovery")
        release.set()
        await eventually(
            lambda: private_admin.counts(queue) == (0, 1), within=30, what="an empty queue"
        )
    # The two handlers that ran across the cut finished on a dead channel: their acks were
    # dropped, and their messages were redelivered and acked on the new channel.
    assert worker.stats.stale_settlements_dropped == 2
    assert worker.stats.reconnects["closed_by_broker"] >= 1
    assert set(done) == set(bodies)
    assert worker.stats.acked == 6
    assert private_admin.counts(queue) == (0, 0)


async def test_consuming_resumes_after_a_broker_restart(
    private_node: BrokerNode, private_admin: Admin, queue: str, node_settings: MakeSettings
) -> None:
    private_admin.declare(queue)
    seen: list[bytes] = []
    settled = Settled()
    app = App(middleware=[settled])

    @app.consumer(queue)
    async def handle(message: Message) -> None:
        seen.append(message.body)

    async with Worker(app, node_settings()) as worker:
        await private_admin.run(private_admin.publish, queue, [b"before"])
        await settled.wait_for(1)
        await asyncio.to_thread(private_node.stop_app)
        await eventually(lambda: not worker.ready, what="the loss to be noticed")
        await asyncio.to_thread(private_node.start_app)
        await eventually(lambda: worker.ready, within=60, what="recovery")
        await private_admin.run(private_admin.publish, queue, [b"after"])
        await settled.wait_for(2)
    assert seen == [b"before", b"after"]
    assert worker.stats.acked == 2
    assert worker.stats.reconnect_count >= 1


async def test_a_handler_that_finishes_while_its_connection_dies_is_not_blamed(
    private_node: BrokerNode,
    private_admin: Admin,
    queue: str,
    tmp_path: Path,
    node_settings: MakeSettings,
) -> None:
    """Classic queue, no process crash: the connection is closed under a running sync handler
    (a broker-side limit, a proxy) which then finishes. A handler that finished is not a crash,
    however often that happens: it is never dead-lettered as a crash loop (max_deliveries 3)."""
    private_admin.declare(queue)
    private_admin.publish(queue, [b"connection lost under it"])
    runs: list[bool] = []
    app = App(retry=RetryPolicy(max_deliveries=3))

    @app.consumer(queue)
    def handle(message: Message) -> None:
        runs.append(message.redelivered)
        if len(runs) <= 4:
            private_node.close_all_connections("test: lost under a running handler")

    async with Worker(app, node_settings(state_dir=tmp_path)) as worker:
        await eventually(lambda: worker.stats.acked == 1, within=60, what="the ack")
    assert runs == [False, True, True, True, True]
    assert worker.stats.dead_lettered == 0
    assert worker.stats.reconnect_count >= 4
    assert private_admin.counts(f"{queue}.dlq") == (0, 0)
    assert private_admin.counts(queue) == (0, 0)
