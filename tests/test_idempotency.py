"""Exactly-once effects and jobs longer than consumer_timeout, on the real broker.

A message with a ``message_id`` runs at most once to completion: a copy of one that completed is
acked without running; a copy that arrives while it runs waits for that run's outcome; a failed
run releases its lease, so its retry runs. A run still going near ``consumer_timeout`` is handed
off (a marker in the delay queue, then the ack) and goes on under its lease.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pika
import pika.exceptions
import pytest

from steadyrabbit import App, Message, Middleware, Publish, RetryPolicy, Settings, Worker
from steadyrabbit._headers import LEASE_TOKEN
from steadyrabbit._middleware import PublishNext
from tests._broker import BrokerNode, close_main_broker_connections
from tests.conftest import MAIN_URL, Admin, MakeSettings, Settled, eventually

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


def with_id(message_id: str) -> pika.BasicProperties:
    return pika.BasicProperties(delivery_mode=2, message_id=message_id)


def reset_consume_connection(settings: Settings) -> None:
    name = f"{settings.name} (consume)"
    closed = close_main_broker_connections("client_properties", lambda v: name in v, "reset")
    assert closed == 1


async def test_a_copy_of_a_completed_message_is_acked_without_running(
    queue_name: str, admin: Admin, named_settings: MakeSettings
) -> None:
    """The producer sent one order twice (same id, same body): it runs once. The same id with
    another body is another message, and runs."""
    admin.declare(queue_name)
    runs: list[bytes] = []
    settled = Settled()
    app = App(middleware=[settled])

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        runs.append(message.body)

    async with Worker(app, named_settings()) as worker:
        for body in (b"order 1", b"order 1", b"order 1 (changed)"):
            await admin.run(admin.publish, queue_name, [body], properties=with_id("id-1"))
        await settled.wait_for(3)
        assert worker.stats.duplicates == 1
        assert worker.stats.succeeded == 2
    assert runs == [b"order 1", b"order 1 (changed)"]
    assert admin.counts(queue_name) == (0, 0)


async def test_a_message_whose_ack_was_lost_in_a_reset_is_not_run_again(
    queue_name: str, admin: Admin, named_settings: MakeSettings
) -> None:
    """The seed's duplicate: the handler completed, the connection reset before its ack got
    out, the broker redelivered it. The redelivery is acked without running."""
    admin.declare(queue_name)
    settings = named_settings()
    runs: list[bool] = []
    app = App()

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        runs.append(message.redelivered)
        if not message.redelivered:
            # The effect is done; the connection dies before the ack can leave.
            await asyncio.to_thread(reset_consume_connection, settings)

    async with Worker(app, settings) as worker:
        await admin.run(admin.publish, queue_name, [b"pay 10 EUR"], properties=with_id("pay-1"))
        await eventually(lambda: worker.stats.duplicates == 1, what="the duplicate suppressed")
    assert admin.counts(queue_name) == (0, 0)
    assert runs == [False]


async def test_a_copy_that_arrives_while_the_first_run_goes_on_waits_for_it(
    queue_name: str, admin: Admin, named_settings: MakeSettings
) -> None:
    """A reset while the handler runs: the broker redelivers the message on the new
    connection at once. That copy waits (it never runs beside the first run), and is acked
    without running once the first run completed."""
    admin.declare(queue_name)
    settings = named_settings()
    started: list[bool] = []
    running = 0
    most_at_once = 0
    app = App()

    @app.consumer(queue_name, concurrency=2)
    async def handle(message: Message) -> None:
        nonlocal running, most_at_once
        started.append(message.redelivered)
        running += 1
        most_at_once = max(most_at_once, running)
        try:
            if not message.redelivered:
                await asyncio.to_thread(reset_consume_connection, settings)
                await asyncio.sleep(2)  # the redelivery arrives meanwhile
        finally:
            running -= 1

    async with Worker(app, settings) as worker:
        await admin.run(admin.publish, queue_name, [b"ship"], properties=with_id("ship-1"))
        await eventually(lambda: worker.stats.duplicates == 1, what="the duplicate suppressed")
    assert admin.counts(queue_name) == (0, 0)
    assert started == [False]
    assert most_at_once == 1


async def test_a_failed_run_releases_its_lease_and_its_retry_runs(
    queue_name: str, admin: Admin, named_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    settled = Settled()
    attempts: list[int] = []
    app = App(middleware=[settled], retry=RetryPolicy(max_attempts=3, delays=(0.1,)))

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        attempts.append(message.attempt)
        if message.attempt < 3:
            raise RuntimeError("not yet")

    async with Worker(app, named_settings()) as worker:
        await admin.run(admin.publish, queue_name, [b"flaky"], properties=with_id("flaky-1"))
        await settled.wait_for(3)
        assert worker.stats.duplicates == 0
    assert attempts == [1, 2, 3]


async def test_idempotency_off_runs_every_copy(
    queue_name: str, admin: Admin, named_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    settled = Settled()
    runs: list[bytes] = []
    app = App(middleware=[settled])

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        runs.append(message.body)

    async with Worker(app, named_settings(idempotency=False)):
        for _ in range(2):
            await admin.run(admin.publish, queue_name, [b"again"], properties=with_id("a-1"))
        await settled.wait_for(2)
    assert runs == [b"again", b"again"]


async def test_a_key_function_decides_what_is_the_same_message(
    queue_name: str, admin: Admin, named_settings: MakeSettings
) -> None:
    """A consumer's own key: here the order number in the body, whatever the message id."""
    admin.declare(queue_name)
    settled = Settled()
    runs: list[bytes] = []
    app = App(middleware=[settled])

    def order_number(message: Message) -> str | None:
        return message.body.split(b":")[0].decode()

    @app.consumer(queue_name, idempotency_key=order_number)
    async def handle(message: Message) -> None:
        runs.append(message.body)

    async with Worker(app, named_settings()) as worker:
        await admin.run(admin.publish, queue_name, [b"7:first", b"7:second", b"8:third"])
        await settled.wait_for(3)
        assert worker.stats.duplicates == 1
    assert runs == [b"7:first", b"8:third"]


@pytest.mark.slow
async def test_a_job_longer_than_consumer_timeout_completes_once_and_trips_nothing(
    private_node: BrokerNode, private_admin: Admin, queue_name: str, node_settings: MakeSettings
) -> None:
    """The broker's consumer_timeout is 5 s; the handler runs 20 s. It is handed off (marker,
    then ack) and completes exactly once; the broker closes no channel, and the other message
    the worker holds is not redelivered."""
    private_admin.declare(queue_name)
    settled = Settled()
    runs: list[tuple[bytes, bool]] = []
    app = App(middleware=[settled])

    @app.consumer(queue_name, concurrency=2)
    async def handle(message: Message) -> None:
        runs.append((message.body, message.redelivered))
        await asyncio.sleep(20 if message.body == b"long" else 0.1)

    async with Worker(app, node_settings(consumer_timeout=5, lease=3)) as worker:
        await private_admin.run(
            private_admin.publish, queue_name, [b"long"], properties=with_id("long-1")
        )
        await private_admin.run(private_admin.publish, queue_name, [b"short"])
        await settled.wait_for(2, within=60)
        assert worker.stats.channel_recoveries == 0
        assert worker.stats.handed_off >= 1
        # The marker (delayed again while the run was alive) comes back, finds the run done,
        # and is dropped.
        markers = worker.stats.markers
        await eventually(
            lambda: worker.stats.markers > markers, within=20, what="a marker settled"
        )
    # Whatever is still queued is a marker of the finished run (one delayed again at the very
    # end, or in flight when the worker stopped): the next worker drops it. Nothing else is.
    leftovers = [
        *private_admin.drain(queue_name),
        *private_admin.drain(f"{queue_name}.retry.3000ms"),
    ]
    assert all(LEASE_TOKEN in (props.headers or {}) for props, _ in leftovers), leftovers
    assert sorted(runs) == [(b"long", False), (b"short", False)]


def ready(admin: Admin, queue: str) -> int:
    """Messages ready in ``queue``; 0 while it does not exist (a retry queue before its first
    copy)."""
    try:
        return admin.counts(queue)[0]
    except pika.exceptions.ChannelClosedByBroker:
        return 0


def start_long_app(tmp_path: Path, queue: str, log: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "steadyrabbit", "run", "tests.long_app:app",
        "--url", MAIN_URL, "--log-level", "warning",
        # The worker's idea of the broker's consumer_timeout: runs are handed off at 2.4 s.
        "--consumer-timeout", "4", "--lease", "2",
    ]  # fmt: skip
    environment = {
        **os.environ,
        "STEADYRABBIT_STATE_DIR": str(tmp_path / "state"),
        "LONG_QUEUE": queue,
        "LONG_LOG": str(log),
        "LONG_SECONDS": "6",
    }
    with (tmp_path / "stderr.log").open("ab") as stderr:
        return subprocess.Popen(command, cwd=ROOT, env=environment, stderr=stderr)


@pytest.mark.slow  # waits out broker timeouts or processes: CI's slow pass
async def test_a_job_whose_worker_is_killed_after_its_hand_off_is_finished_by_another(
    queue_name: str, admin: Admin, tmp_path: Path
) -> None:
    """SIGKILL mid-job, after the hand-off acked the delivery: the broker has nothing to
    redeliver, but the marker comes back, finds the lease of a dead worker, and a second
    worker runs the job. It runs twice at most: once killed, once completed."""
    admin.declare(queue_name)
    log = tmp_path / "runs.log"
    admin.publish(queue_name, [b"render"], properties=with_id("render-1"))
    first = start_long_app(tmp_path, queue_name, log)
    try:
        await eventually(lambda: log.exists() and "start render" in log.read_text(), what="run 1")
        # Handed off at 2.4 s: the marker waits in the delay queue, the delivery is acked.
        await eventually(
            lambda: ready(admin, f"{queue_name}.retry.2000ms") == 1, what="the marker"
        )
        assert admin.counts(queue_name)[0] == 0
    finally:
        first.kill()
        first.wait(timeout=10)
    second = start_long_app(tmp_path, queue_name, log)
    try:
        await eventually(lambda: "done render" in log.read_text(), within=30, what="the job done")
        # The last marker comes back, finds the run done, and is dropped.
        await eventually(
            lambda: ready(admin, f"{queue_name}.retry.2000ms") == 0
            and ready(admin, queue_name) == 0,
            within=10,
            what="nothing left queued",
        )
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=20)
    lines = log.read_text().splitlines()
    starts = [line for line in lines if line.startswith("start render")]
    assert len(starts) == 2, lines
    assert [line for line in lines if line.startswith("done render")] == [
        f"done render pid={second.pid}"
    ]
    assert second.returncode == 0, (tmp_path / "stderr.log").read_text()


@pytest.mark.slow
async def test_a_long_job_without_a_message_id_is_handed_off_and_runs_once(
    private_node: BrokerNode, private_admin: Admin, queue_name: str, node_settings: MakeSettings
) -> None:
    """No message_id, no deduplication: the run still gets a lease of its own when it is
    handed off, and its marker, back after the run, is dropped instead of running it again."""
    private_admin.declare(queue_name)
    settled = Settled()
    runs: list[bool] = []
    app = App(middleware=[settled])

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        runs.append(message.redelivered)
        await asyncio.sleep(8)

    async with Worker(app, node_settings(consumer_timeout=5, lease=2)) as worker:
        await private_admin.run(private_admin.publish, queue_name, [b"no id"])
        await settled.wait_for(1, within=30)
        assert worker.stats.handed_off >= 1
        markers = worker.stats.markers
        await eventually(
            lambda: worker.stats.markers > markers, within=15, what="the last marker dropped"
        )
        assert worker.stats.channel_recoveries == 0
    assert runs == [False]
    leftovers = [
        *private_admin.drain(queue_name),
        *private_admin.drain(f"{queue_name}.retry.2000ms"),
    ]
    assert all(LEASE_TOKEN in (props.headers or {}) for props, _ in leftovers), leftovers


class SlowCopies(Middleware):
    """Holds every copy steadyrabbit publishes (a marker here) for a second; ``published`` is
    set once the broker confirmed one."""

    def __init__(self) -> None:
        self.published = asyncio.Event()

    async def around_publish(self, publish: Publish, call_next: PublishNext) -> None:
        await asyncio.sleep(1)
        await call_next(publish)
        self.published.set()


async def test_a_run_that_ends_while_its_marker_is_published_is_acked_once(
    queue_name: str, admin: Admin, named_settings: MakeSettings
) -> None:
    """The hand-off starts at 60 % of consumer_timeout (1.2 s here), its marker takes a second
    to publish, the run ends at 1.5 s and is acked: the hand-off must not ack it again (a tag
    acked twice closes the channel with 406 unknown delivery tag)."""
    admin.declare(queue_name)
    settled = Settled()
    slow = SlowCopies()
    app = App(middleware=[settled, slow])

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        await asyncio.sleep(1.5)

    async with Worker(app, named_settings(consumer_timeout=2, lease=1)) as worker:
        await admin.run(admin.publish, queue_name, [b"ends mid hand-off"])
        await settled.wait_for(1)
        await asyncio.wait_for(slow.published.wait(), 10)
        # A second ack would go out in this loop turn; the broker's 406 comes back within a
        # round trip on this machine (no event says "no close is coming").
        await asyncio.sleep(0.3)
        assert worker.stats.handed_off == 0
        assert worker.stats.channel_recoveries == 0
        assert worker.stats.succeeded == 1
