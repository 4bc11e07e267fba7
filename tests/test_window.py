"""The adaptive prefetch window: pure rules, then a consumer on a private node whose handlers
switch from fast to slow mid-run."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from steadyrabbit import App, Message, Worker
from steadyrabbit._window import AdaptiveWindow, wait_budget
from steadyrabbit.testing import BrokerNode
from tests.conftest import Admin, MakeSettings, Settled
from tests.test_metrics import get


def test_the_budget_is_a_small_share_of_consumer_timeout_and_at_most_a_second() -> None:
    assert wait_budget(1800) == 1.0
    assert wait_budget(5) == 0.25


def test_fast_handlers_grow_the_window_at_once_up_to_the_cap() -> None:
    window = AdaptiveWindow(concurrency=1, budget=1.0)
    assert window.window == 1
    assert window.observe(0.0001) == 1000  # 0.5 s / 100 µs = 5,000 waiting: the cap
    assert "at the cap of 1000" in window.reason
    assert window.observe(0.0001) is None


def test_slow_handlers_keep_it_at_the_concurrency() -> None:
    window = AdaptiveWindow(concurrency=4, budget=1.0)
    for _ in range(50):
        assert window.observe(70.0) is None
    assert window.window == 4


def test_one_slow_run_shrinks_it_at_once_and_speed_grows_it_back_gradually() -> None:
    window = AdaptiveWindow(concurrency=2, budget=1.0)
    window.observe(0.001)
    assert window.window == 1000
    assert window.observe(2.0) == 2  # the first slow run
    assert "none is sent ahead" in window.reason
    grown = [w for w in (window.observe(0.001) for _ in range(2000)) if w is not None]
    assert grown == sorted(grown)
    assert grown[-1] == 1000
    assert len(grown) > 3  # step by step, as the high estimate decays


def test_small_changes_do_not_flap() -> None:
    window = AdaptiveWindow(concurrency=10, budget=1.0)
    window.observe(0.01)  # 10 + 0.5 x 10 / 0.01 = 510
    changes = [window.observe(duration) for duration in [0.011, 0.0095, 0.0105, 0.01] * 50]
    assert all(change is None for change in changes)
    assert window.window == 510


@pytest.mark.anyio
@pytest.mark.slow
@pytest.mark.private_node
async def test_a_switch_to_slow_handlers_trips_no_consumer_timeout_and_nothing_waits(
    private_node: BrokerNode, private_admin: Admin, make_settings: MakeSettings
) -> None:
    """consumer_timeout 5 s (budget 0.25 s); 300 1 ms runs, then 6 of 2 s: the window grows,
    then shrinks at the first slow run; no message waited unstarted past its budget (from
    delivery to handler start), no channel was closed by the broker."""
    queue = "window-switch"
    private_admin.declare(queue)
    settled = Settled()
    app = App(middleware=[settled])
    waits: list[float] = []
    windows: list[int] = []

    @app.consumer(queue, concurrency=2)
    async def handle(message: Message) -> None:
        waits.append(time.monotonic() - message.received_at)
        await asyncio.sleep(2.0 if message.body == b"slow" else 0.001)

    bodies = [b"fast"] * 300 + [b"slow"] * 6
    settings = make_settings(private_node.url, consumer_timeout=5, metrics_port=0)
    try:
        async with Worker(app, settings) as worker:
            private_admin.publish(queue, bodies[:300])
            await settled.wait_for(300)
            status = json.loads((await get(worker, "/status.json")).body)
            windows.append(status["consumers"][0]["prefetch"])
            private_admin.publish(queue, bodies[300:])
            await settled.wait_for(306, within=40)
            status = json.loads((await get(worker, "/status.json")).body)
            windows.append(status["consumers"][0]["prefetch"])
            reason = status["consumers"][0]["prefetch_reason"]
            assert worker.stats.channel_recoveries == 0
    finally:
        private_admin.delete(queue, f"{queue}.dlq")
    assert windows[0] > 2, windows  # grown (how far depends on this machine's speed)
    assert windows[1] == 2, (windows, reason)
    assert "none is sent ahead" in reason
    assert max(waits) <= 0.25 + 0.05, sorted(waits)[-5:]
