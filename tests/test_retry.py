"""Delayed retries, poison messages, crash loops and conflicting queues, on the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pika.exceptions
import pytest

from steadyrabbit import (
    App,
    Message,
    Outcome,
    Reject,
    Retry,
    RetryPolicy,
    TopologyConflictError,
    Worker,
)
from tests.conftest import MAIN_URL, Admin, MakeSettings, Settled, eventually

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.anyio


def dead_letters(admin: Admin, queue: str) -> int:
    """Messages in the queue's DLQ; 0 while it does not exist yet."""
    with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
        return admin.counts(f"{queue}.dlq")[0]
    return 0


def handled_fine(log: Path) -> bool:
    """Whether the crash app's log shows the "fine 1" message handled."""
    return log.exists() and any(line.startswith("fine 1") for line in log.read_text().splitlines())


def restart_crash_app(
    tmp_path: Path, env: dict[str, str], *, lives: int, until: Callable[[], bool]
) -> None:
    """Run ``tests.crash_app`` as a supervisor would: start it again each time a message kills
    it (exit 70), at most ``lives`` times, until ``until()`` holds while it runs; then stop it
    with SIGTERM, which must end it cleanly."""
    command = [
        sys.executable, "-m", "steadyrabbit", "run", "tests.crash_app:app",
        "--url", MAIN_URL, "--log-level", "warning",
    ]
    environment = {**os.environ, "STEADYRABBIT_STATE_DIR": str(tmp_path / "state"), **env}
    stderr_path = tmp_path / "stderr.log"
    for _ in range(lives):
        with stderr_path.open("ab") as stderr_file:
            worker = subprocess.Popen(command, cwd=ROOT, env=environment, stderr=stderr_file)
        try:
            deadline = time.monotonic() + 20
            while worker.poll() is None and time.monotonic() < deadline:
                if until():
                    break
                time.sleep(0.1)
            if worker.poll() is None:
                return  # it stays up: no message kills it any more
            assert worker.returncode == 70, stderr_path.read_text()
        finally:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
                worker.wait(timeout=20)
                assert worker.returncode == 0, stderr_path.read_text()


def cleanup_retry_queues(admin: Admin, queue: str, delays_ms: list[int]) -> None:
    admin.delete(*(f"{queue}.retry.{ms}ms" for ms in delays_ms))


async def test_a_poison_message_is_tried_max_attempts_times_at_the_policy_delays(
    queue_name: str, admin: Admin, tmp_path: Path, make_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    policy = RetryPolicy(max_attempts=4, delays=(0.5, 1.0, 1.5))
    attempts: list[float] = []
    good: list[bytes] = []
    app = App()

    @app.consumer(queue_name, retry=policy, concurrency=2)
    async def handle(message: Message) -> None:
        if message.body == b"poison":
            attempts.append(time.monotonic())
            raise ValueError("this message can never be handled")
        good.append(message.body)

    try:
        async with Worker(app, make_settings()) as worker:
            await admin.run(admin.publish, queue_name, [b"poison"])
            # Other messages keep flowing while the poison one waits between attempts.
            for n in range(5):
                await asyncio.sleep(0.3)
                await admin.run(admin.publish, queue_name, [f"good {n}".encode()])
            await eventually(lambda: worker.stats.dead_lettered == 1, within=20, what="the DLQ")
    finally:
        cleanup_retry_queues(admin, queue_name, [500, 1000, 1500])
    assert len(attempts) == 4
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    for gap, expected in zip(gaps, [0.5, 1.0, 1.5], strict=True):
        assert expected - 0.05 <= gap <= expected + 1.0, gaps
    assert len(good) == 5
    assert worker.stats.retried == 3
    assert admin.counts(queue_name) == (0, 0)
    [(props, body)] = admin.drain(f"{queue_name}.dlq")
    headers = props.headers or {}
    assert body == b"poison"
    assert headers["x-steadyrabbit-attempts"] == 4
    assert headers["x-steadyrabbit-reason"] == (
        "gave up after 4 attempts: ValueError: this message can never be handled"
    )
    assert headers["x-steadyrabbit-exception"] == "ValueError"
    assert str(headers["x-steadyrabbit-first-failed-at"]) < str(headers["x-steadyrabbit-failed-at"])
    assert "x-death" not in headers


async def test_a_transient_failure_ends_acked_once_with_no_dead_letter(
    queue_name: str, admin: Admin, tmp_path: Path, make_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    admin.publish(queue_name, [b"flaky"])
    seen: list[int] = []
    app = App(retry=RetryPolicy(max_attempts=5, base=0.2, cap=1.0))

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        attempt = int(message.headers.get("x-steadyrabbit-attempts") or 0) + 1
        seen.append(attempt)
        if attempt <= 2:
            raise ConnectionError("downstream briefly unavailable")

    async with Worker(app, make_settings()) as worker:
        await eventually(lambda: seen == [1, 2, 3] and worker.in_flight == 0, what="success")
    assert worker.stats.retried == 2
    assert worker.stats.dead_lettered == 0
    assert admin.counts(queue_name) == (0, 0)
    assert admin.counts(f"{queue_name}.dlq") == (0, 0)
    for name in {f"{queue_name}.retry.{ms}ms" for ms in (100, 150, 200, 300, 500, 700, 1000)}:
        admin.delete(name)


async def test_retry_with_an_explicit_delay_and_permanent_errors(
    queue_name: str, admin: Admin, tmp_path: Path, make_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    admin.publish(queue_name, [b"later", b"bad-input", b"refused"])
    times: dict[bytes, list[float]] = {}
    app = App(retry=RetryPolicy(max_attempts=3, delays=(30,), permanent=(KeyError,)))

    @app.consumer(queue_name, concurrency=3)
    async def handle(message: Message) -> None:
        times.setdefault(message.body, []).append(time.monotonic())
        if message.body == b"later" and len(times[b"later"]) == 1:
            raise Retry("not yet", delay=0.7)
        if message.body == b"bad-input":
            raise KeyError("customer_id")
        if message.body == b"refused":
            raise Reject("unknown order type")

    try:
        async with Worker(app, make_settings()) as worker:
            await eventually(
                lambda: len(times.get(b"later", [])) == 2 and worker.stats.dead_lettered == 2,
                what="the retry and two dead letters",
            )
    finally:
        admin.delete(f"{queue_name}.retry.700ms", f"{queue_name}.retry.30000ms")
    first, second = times[b"later"]
    assert 0.65 <= second - first <= 2.0
    assert len(times[b"bad-input"]) == 1, "a permanent error type is not retried"
    assert len(times[b"refused"]) == 1
    reasons = {
        body: (props.headers or {})["x-steadyrabbit-reason"]
        for props, body in admin.drain(f"{queue_name}.dlq")
    }
    assert reasons == {b"bad-input": "KeyError: 'customer_id'", b"refused": "unknown order type"}


async def test_messages_waiting_in_retry_queues_survive_a_killed_consumer(
    queue_name: str, admin: Admin, tmp_path: Path, make_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    admin.publish(queue_name, [f"m{n}".encode() for n in range(5)])
    handled: dict[bytes, int] = {}
    app = App(retry=RetryPolicy(max_attempts=3, delays=(2.0,)))

    @app.consumer(queue_name, concurrency=5)
    async def handle(message: Message) -> None:
        handled[message.body] = handled.get(message.body, 0) + 1
        if not message.redelivered and "x-steadyrabbit-attempts" not in message.headers:
            raise TimeoutError("first try always fails")

    try:
        first = Worker(app, make_settings())
        await first.start()
        await eventually(lambda: first.stats.retried == 5, what="5 retries scheduled")
        await first.abort()  # killed while all five wait in the retry queue
        assert admin.counts(f"{queue_name}.retry.2000ms") == (5, 0)
        async with Worker(app, make_settings()) as second:
            await eventually(lambda: second.stats.acked == 5, within=20, what="5 acks")
    finally:
        admin.delete(f"{queue_name}.retry.2000ms")
    assert handled == {f"m{n}".encode(): 2 for n in range(5)}
    assert admin.counts(queue_name) == (0, 0)
    assert admin.counts(f"{queue_name}.dlq") == (0, 0)


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_a_handler_that_kills_its_process_every_time_ends_in_the_dead_letter_queue(
    queue_name: str, admin: Admin, tmp_path: Path, queue_type: str
) -> None:
    """Every attempt kills the worker process; a supervisor (here the test) restarts it. After
    max_deliveries (3) unsettled deliveries the message is dead-lettered instead of run."""
    arguments = {"x-queue-type": "quorum"} if queue_type == "quorum" else None
    admin.declare(queue_name, arguments=arguments)
    admin.publish(queue_name, [b"poison pill", b"fine 1"])
    log = tmp_path / "attempts.log"
    # Stop only once the message behind the poison one has been handled too: a SIGTERM right
    # after the dead-lettering would return "fine 1" unstarted.
    restart_crash_app(
        tmp_path,
        {"CRASH_QUEUE": queue_name, "CRASH_QUEUE_TYPE": queue_type, "CRASH_LOG": str(log)},
        lives=6,
        until=lambda: dead_letters(admin, queue_name) == 1 and handled_fine(log),
    )
    attempts = [line for line in log.read_text().splitlines() if line.startswith("poison")]
    assert len(attempts) == 3, attempts
    [(props, body)] = admin.drain(f"{queue_name}.dlq")
    assert body == b"poison pill"
    reason = (props.headers or {})["x-steadyrabbit-reason"]
    assert "started 3 times without finishing" in str(reason)
    assert handled_fine(log)
    assert admin.counts(queue_name) == (0, 0)
    admin.delete(f"{queue_name}.retry.100ms")


async def test_a_dead_letter_queue_with_other_arguments_is_a_clear_error(
    queue_name: str, admin: Admin, tmp_path: Path, make_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    admin.declare(f"{queue_name}.dlq", arguments={"x-queue-type": "quorum"})
    app = App()
    app.add_consumer(lambda message: None, queue_name)

    with pytest.raises(TopologyConflictError) as info:
        await Worker(app, make_settings()).start()
    message = str(info.value)
    assert f"queue '{queue_name}.dlq' already exists with x-queue-type = 'quorum'" in message
    assert "steadyrabbit declares it with x-queue-type = (not set)" in message
    assert "change the setting" in message


async def test_a_retry_queue_with_another_ttl_is_a_clear_error(
    queue_name: str, admin: Admin, tmp_path: Path, make_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    admin.declare(f"{queue_name}.retry.5000ms", arguments={"x-message-ttl": 1234})
    app = App()
    app.add_consumer(lambda message: None, queue_name, retry=RetryPolicy(delays=(5,)))

    try:
        with pytest.raises(TopologyConflictError, match="x-message-ttl = '1234'"):
            await Worker(app, make_settings()).start()
    finally:
        admin.delete(f"{queue_name}.retry.5000ms")


async def test_retries_on_quorum_queues(
    queue_name: str, admin: Admin, tmp_path: Path, make_settings: MakeSettings
) -> None:
    admin.declare(queue_name, arguments={"x-queue-type": "quorum"})
    admin.publish(queue_name, [b"x"])
    seen: list[float] = []
    settled = Settled()
    app = App(
        queue_type="quorum",
        retry=RetryPolicy(max_attempts=3, delays=(0.3,)),
        middleware=[settled],
    )

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        seen.append(time.monotonic())
        raise RuntimeError("always")

    try:
        async with Worker(app, make_settings()):
            await settled.wait_for(1, Outcome.DEAD_LETTER)
    finally:
        admin.delete(f"{queue_name}.retry.300ms")
    assert len(seen) == 3
    assert [(d.outcome, d.attempt) for _, d in settled.decisions] == [
        (Outcome.RETRY, 1), (Outcome.RETRY, 2), (Outcome.DEAD_LETTER, 3),
    ]
    [(props, _)] = admin.drain(f"{queue_name}.dlq")
    assert (props.headers or {})["x-steadyrabbit-attempts"] == 3
