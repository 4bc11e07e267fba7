"""What depends on the broker's version, on a private RabbitMQ 4.0 node.

The node comes from the shared script that unpacks Debian 13's packages without installing them
(``shared/rabbitmq4/start-node`` beside the checkout or a folder above it, or
``$STEADYRABBIT_RABBITMQ4``); without the script these tests are skipped, saying so. Marked
``slow`` (.ci/run's second pass runs them) and ``rabbitmq4`` (``./scripts/test -m rabbitmq4``
runs just them).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from steadyrabbit import App, Message, Reject, RetryPolicy, Settings, Worker
from steadyrabbit._amqp import AmqpConnection
from steadyrabbit._url import parse_url
from tests.conftest import Admin, MakeSettings, Settled

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.rabbitmq4]

def _script() -> Path:
    """``$STEADYRABBIT_RABBITMQ4``, else ``shared/rabbitmq4/start-node`` beside the checkout
    or beside any folder above it (a clean clone may sit deeper than the workplace's own)."""
    given = os.environ.get("STEADYRABBIT_RABBITMQ4")
    if given:
        return Path(given)
    root = Path(__file__).resolve().parents[1]
    for folder in root.parents:
        candidate = folder / "shared" / "rabbitmq4" / "start-node"
        if candidate.exists():
            return candidate
    return root.parent / "shared" / "rabbitmq4" / "start-node"


SCRIPT = _script()
PORT = 5961


@pytest.fixture(scope="module")
def rabbitmq4() -> Iterator[str]:
    """A RabbitMQ 4.0 node with consumer_timeout 5 s, checked every second."""
    if not SCRIPT.exists():
        pytest.skip(f"no RabbitMQ 4 script at {SCRIPT} (set STEADYRABBIT_RABBITMQ4)")
    env = {
        **os.environ,
        "RMQ4_PORT": str(PORT),
        "RMQ4_CONF": "consumer_timeout = 5000\n",
        "RMQ4_ADVANCED_CONF": "[{rabbit, [{channel_tick_interval, 1000}]}].",
        "RMQ4_FRESH": "1",
    }
    started = subprocess.run(
        [str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)


@pytest.fixture
def queue4(rabbitmq4: str) -> Iterator[str]:
    name = f"sr-test4-{uuid.uuid4().hex[:10]}"
    yield name
    Admin(rabbitmq4).delete(name, f"{name}.dlq")


def settings4(make_settings: MakeSettings, url: str, **overrides: object) -> Settings:
    return make_settings(url, consumer_timeout=5, lease=3, **overrides)


async def test_the_node_is_rabbitmq_4(rabbitmq4: str) -> None:
    connection = await AmqpConnection.open(
        parse_url(rabbitmq4), heartbeat=10, connect_timeout=10, name="test: version"
    )
    try:
        assert connection.server_version[:1] == (4,)
    finally:
        connection.close()


@pytest.mark.parametrize("max_duration", [30.0, None], ids=["budget", "no-budget"])
async def test_a_long_run_is_handed_off_with_or_without_a_declared_budget(
    rabbitmq4: str, queue4: str, make_settings: MakeSettings, max_duration: float | None
) -> None:
    """consumer_timeout is 5 s; the handler runs 10 s. A declared 30 s budget goes out as
    x-consumer-timeout, which RabbitMQ 4.0.5 ignores (measured: the channel closes at 5 s
    without the hand-off), so the run is handed off either way: one run, no channel closed."""
    Admin(rabbitmq4).declare(queue4)
    settled = Settled()
    runs: list[bool] = []
    app = App(middleware=[settled])

    @app.consumer(queue4, max_duration=max_duration)
    async def handle(message: Message) -> None:
        runs.append(message.redelivered)
        await asyncio.sleep(10)

    async with Worker(app, settings4(make_settings, rabbitmq4)) as worker:
        await asyncio.to_thread(Admin(rabbitmq4).publish, queue4, [b"long"])
        await settled.wait_for(1, within=40)
        assert worker.stats.handed_off >= 1
        assert worker.stats.channel_recoveries == 0
    assert runs == [False]


async def test_a_failing_message_of_a_quorum_queue_is_dead_lettered_not_dropped(
    rabbitmq4: str, queue4: str, make_settings: MakeSettings
) -> None:
    """On 4.x a quorum queue drops a message delivered 20 times (its default delivery-limit)
    unless it has a dead-letter route. steadyrabbit never requeues a failure: each retry is a
    copy, so the count never climbs, and the message ends in <queue>.dlq with its reason."""
    admin = Admin(rabbitmq4)
    admin.declare(queue4, {"x-queue-type": "quorum"})
    settled = Settled()
    app = App(
        middleware=[settled],
        queue_type="quorum",
        retry=RetryPolicy(max_attempts=25, delays=(0.05,)),
    )

    @app.consumer(queue4)
    async def handle(message: Message) -> None:
        if message.attempt < 25:
            raise RuntimeError(f"failure {message.attempt}")
        raise Reject("still failing after 24 retries")

    async with Worker(app, settings4(make_settings, rabbitmq4)):
        await asyncio.to_thread(admin.publish, queue4, [b"poison"])
        await settled.wait_for(25, within=60)
    letters = admin.drain(f"{queue4}.dlq")
    assert [body for _, body in letters] == [b"poison"]
    reason = (letters[0][0].headers or {})["x-steadyrabbit-reason"]
    assert reason == "still failing after 24 retries"
