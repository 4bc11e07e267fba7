"""Crash loops blame only the message that crashes, on the real broker.

A crash is a start of this message that never finished: the process died under it, or its
async handler blocked the event loop until the connection died. A handler that finished is
never a crash, whatever happened to its ack; a requeue of a message that never started is never
a crash; distinct messages with the same body are not one message.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pika
import pytest

from steadyrabbit import App, ConfigurationError, Message, RetryPolicy, Worker
from steadyrabbit._headers import REASON
from tests._broker import BrokerNode, close_main_broker_connections
from tests.conftest import MAIN_URL, Admin, MakeSettings, eventually
from tests.test_retry import dead_letters, restart_crash_app


async def reset_consume_connection(worker: Worker) -> None:
    """Close the worker's consuming connection, broker side, as a network reset would."""
    name = f"{worker.settings.name} (consume)"
    closed = await asyncio.to_thread(
        close_main_broker_connections, "client_properties", lambda v: name in v, "test: reset"
    )
    assert closed == 1


pytestmark = pytest.mark.anyio


def test_a_process_killer_does_not_take_its_neighbours_into_the_dead_letter_queue(
    queue_name: str, admin: Admin, tmp_path: Path
) -> None:
    """Issue 8.13: concurrency 4, one message kills the process (SIGKILL-like) while three
    200 ms messages run beside it. Only the killer is dead-lettered; the others are handled."""
    admin.declare(queue_name)
    neighbours = [b"slow 1", b"slow 2", b"slow 3"]
    admin.publish(queue_name, [b"poison", *neighbours])
    log = tmp_path / "attempts.log"

    def done() -> set[str]:
        lines = log.read_text().splitlines() if log.exists() else []
        return {line.removeprefix("done ") for line in lines if line.startswith("done ")}

    restart_crash_app(
        tmp_path,
        {"CRASH_QUEUE": queue_name, "CRASH_CONCURRENCY": "4", "CRASH_LOG": str(log)},
        lives=10,
        until=lambda: dead_letters(admin, queue_name) == 1 and len(done()) == 3,
    )
    assert done() == {"slow 1", "slow 2", "slow 3"}
    [(props, body)] = admin.drain(f"{queue_name}.dlq")
    assert body == b"poison"
    assert "without finishing" in str((props.headers or {})[REASON])
    assert admin.counts(queue_name) == (0, 0)


@pytest.mark.slow
@pytest.mark.private_node
async def test_a_finished_handler_whose_ack_was_dropped_is_not_a_crash(
    private_node: BrokerNode, private_admin: Admin, tmp_path: Path, named_settings: MakeSettings
) -> None:
    """Issue 8.13: a 7 s job under consumer_timeout 5 s finishes, but the broker closed the
    channel first and the ack is dropped. It ran again and again and was dead-lettered as a
    crash loop; now it is never blamed (max_deliveries 2, three completions)."""
    queue = "crash-loops-timeout"
    private_admin.delete(queue, f"{queue}.dlq")
    private_admin.declare(queue)
    private_admin.publish(queue, [b"long job"])
    app = App(retry=RetryPolicy(max_deliveries=2))
    completions: list[bool] = []

    @app.consumer(queue)
    def long_job(message: Message) -> None:
        time.sleep(7)
        completions.append(message.redelivered)

    try:
        async with Worker(app, named_settings(private_node.url, heartbeat=5)) as worker:
            await eventually(lambda: len(completions) >= 3, within=90, what="three completions")
            await worker.stop(grace_period=0)
        assert worker.stats.dead_lettered == 0
        assert worker.stats.stale_settlements_dropped >= 3
        assert private_admin.counts(f"{queue}.dlq") == (0, 0)
    finally:
        private_admin.delete(queue, f"{queue}.dlq")


@pytest.mark.slow
@pytest.mark.private_node
async def test_an_async_handler_that_blocks_the_loop_ends_in_the_dead_letter_queue(
    private_node: BrokerNode, private_admin: Admin, tmp_path: Path, named_settings: MakeSettings
) -> None:
    """Issue 8.3: an async handler sleeps 6 s without awaiting, heartbeat 1 s: the broker drops
    the connection, the message comes back. It looped forever and each run counted as a
    success; now each run counts toward max_deliveries (3), none as a success, and the other
    queue of the worker gets its message once the loop is free."""
    queue, other = "crash-loops-blocker", "crash-loops-other"
    for name in (queue, other):
        private_admin.delete(name, f"{name}.dlq")
        private_admin.declare(name)
    private_admin.publish(queue, [b"blocks the loop"])
    app = App(retry=RetryPolicy(max_deliveries=3))
    runs: list[bool] = []
    others: list[bytes] = []

    @app.consumer(queue)
    async def blocker(message: Message) -> None:
        runs.append(message.redelivered)
        time.sleep(6)  # noqa: ASYNC251 - the defect under test

    @app.consumer(other)
    async def fine(message: Message) -> None:
        others.append(message.body)

    try:
        async with Worker(app, named_settings(private_node.url, heartbeat=1)) as worker:
            await eventually(
                lambda: worker.stats.dead_lettered == 1, within=90, what="the dead letter"
            )
            await private_admin.run(private_admin.publish, other, [b"after"])
            await eventually(lambda: others == [b"after"], what="the other queue's message")
        assert runs == [False, True, True]
        counts = {c.spec.queue: c.counts for c in worker.consumers}
        assert counts[queue].succeeded == 0
        [(props, _body)] = private_admin.drain(f"{queue}.dlq")
        assert "started 3 times without finishing" in str((props.headers or {})[REASON])
    finally:
        for name in (queue, other):
            private_admin.delete(name, f"{name}.dlq")


async def test_requeues_of_unstarted_messages_are_not_crashes_on_a_quorum_queue(
    queue_name: str, admin: Admin, tmp_path: Path, named_settings: MakeSettings
) -> None:
    """Issue 8.10: x-delivery-count also counts requeues of messages that never started
    (shutdown, aged prefetch): six of them made the next delivery a "crash loop" without a
    single run. Now only unfinished starts count."""
    admin.declare(queue_name, arguments={"x-queue-type": "quorum"})
    admin.publish(queue_name, [b"requeued six times"])
    with pika.BlockingConnection(pika.URLParameters(MAIN_URL)) as connection:
        channel = connection.channel()
        for _ in range(6):  # what a shutdown or an aged prefetch does: requeue unstarted
            method, _props, _body = channel.basic_get(queue_name)
            assert method is not None
            channel.basic_nack(method.delivery_tag or 0, requeue=True)
    app = App(retry=RetryPolicy(max_deliveries=5))
    handled: list[bytes] = []

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        handled.append(message.body)

    async with Worker(app, named_settings()) as worker:
        await eventually(lambda: worker.stats.acked == 1, what="the ack")
    assert handled == [b"requeued six times"]
    assert worker.stats.dead_lettered == 0


async def test_distinct_messages_with_the_same_body_are_not_one_crash_loop(
    queue_name: str, admin: Admin, tmp_path: Path, named_settings: MakeSettings
) -> None:
    """Issue 8.11: without a message_id, six distinct messages with the same body, redelivered
    after one connection reset, were dead-lettered as a crash loop. Now all six are handled."""
    admin.declare(queue_name)
    app = App(retry=RetryPolicy(max_deliveries=5))
    release = asyncio.Event()
    handled: list[bool] = []

    @app.consumer(queue_name, concurrency=6)
    async def handle(message: Message) -> None:
        if not message.redelivered:
            await release.wait()  # in flight when the connection is reset
        handled.append(message.redelivered)

    async with Worker(app, named_settings()) as worker:
        await admin.run(admin.publish, queue_name, [b"same body"] * 6)
        await eventually(lambda: worker.in_flight == 6, what="six in flight")
        await reset_consume_connection(worker)
        release.set()  # the first round finishes; its acks are dropped as stale
        await eventually(lambda: handled.count(True) == 6, within=30, what="six handled")
    assert sorted(handled) == [False] * 6 + [True] * 6
    assert worker.stats.dead_lettered == 0
    assert admin.counts(f"{queue_name}.dlq") == (0, 0)


async def test_an_unusable_state_directory_stops_the_worker_in_one_sentence(
    queue_name: str, tmp_path: Path, named_settings: MakeSettings
) -> None:
    """Issue 8.4: a state directory that cannot hold the crash log was found out only by the
    first redelivered message. Now the worker refuses to start, naming the directory."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    app = App()
    app.add_consumer(lambda message: None, queue_name)

    with pytest.raises(ConfigurationError) as caught:
        await Worker(app, named_settings(state_dir=blocker / "state")).start()
    assert str(blocker / "state") in str(caught.value)
    assert "\n" not in str(caught.value)


async def test_a_failing_crash_log_is_logged_and_the_message_still_handled(
    queue_name: str,
    admin: Admin,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    named_settings: MakeSettings,
) -> None:
    """Issue 8.4: while running, a crash-log error (here: the database locked by another
    process past the busy timeout) escaped and left the message unacked until
    consumer_timeout. Now it is logged in one line and the message handled."""
    admin.declare(queue_name)
    app = App()
    handled: list[bool] = []
    release = asyncio.Event()

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        if not message.redelivered:
            await release.wait()
        handled.append(message.redelivered)

    async with Worker(app, named_settings()) as worker:
        await admin.run(admin.publish, queue_name, [b"redelivered"])
        await eventually(lambda: worker.in_flight == 1, what="the first start")
        lock = sqlite3.connect(tmp_path / "state" / "deliveries.sqlite3", timeout=1)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            await reset_consume_connection(worker)
            release.set()  # the first run finishes; its ack is dropped as stale
            await eventually(lambda: True in handled, within=30, what="the redelivery")
        finally:
            lock.rollback()
            lock.close()
        await eventually(lambda: worker.stats.acked == 1, what="the ack")
    assert handled == [False, True]
    assert any("crash-loop log" in r.getMessage() for r in caplog.records)
    assert admin.counts(queue_name) == (0, 0)
