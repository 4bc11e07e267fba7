"""Found by the 30-minute soak: a retried copy that waited unstarted when its connection died
came back flagged redelivered, and was taken for the redelivery of its own original (same
message id), whose copy had been confirmed: acked without ever running. Lost."""

from __future__ import annotations

import asyncio
import os

import pika
import pytest

from steadyrabbit import App, Message, Retry, RetryPolicy, Worker
from tests._broker import close_connections_of
from tests.conftest import Admin, MakeSettings, Settled, eventually

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def test_a_retried_copy_redelivered_unstarted_still_runs(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    settled = Settled()
    app = App(middleware=[settled], retry=RetryPolicy(max_attempts=3, delays=(0.05,)))
    runs: list[tuple[bytes, int]] = []
    blocker_started = asyncio.Event()
    copy_waiting = asyncio.Event()

    @app.consumer(queue_name, concurrency=1, prefetch=5)
    async def handle(message: Message) -> None:
        runs.append((message.body, message.attempt))
        if message.body == b"retried" and message.attempt == 1:
            raise Retry("once", delay=0.05)
        if message.body == b"blocker" and not blocker_started.is_set():
            blocker_started.set()
            await copy_waiting.wait()  # holds the only slot while the copy waits behind it

    settings = make_settings(reconnect_delay=0.1)
    try:
        async with Worker(app, settings):
            await admin.run(
                admin.publish, queue_name, [b"retried"],
                properties=pika.BasicProperties(message_id="m-1", delivery_mode=2),
            )  # fmt: skip
            await settled.wait_for(1)  # attempt 1 retried: its copy confirmed, original acked
            await admin.run(admin.publish, queue_name, [b"blocker"])
            await asyncio.wait_for(blocker_started.wait(), 10)
            # The copy comes back from the retry queue and waits, delivered, behind the blocker.
            await eventually(
                lambda: admin.counts(f"{queue_name}.retry.50ms")[0] == 0
                and admin.counts(queue_name)[0] == 0,
                what="the copy delivered",
            )
            assert await asyncio.to_thread(close_connections_of, os.getpid(), "test") >= 1
            copy_waiting.set()
            await settled.wait_for(3, within=20)
    finally:
        admin.delete(f"{queue_name}.retry.50ms")
    assert (b"retried", 2) in runs, runs
