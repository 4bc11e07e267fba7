"""``steadyrabbit demo`` (:func:`run_demo`) against the machine's broker.

Each run publishes a small backlog to a queue of its own, relays it to the demo's fast local
service, resets the worker's connections through the demo's proxy a third of the way through,
and must account for every message. The checks read the result, the broker and the output.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pika
import pika.exceptions
import pytest

from steadyrabbit._errors import ConfigurationError
from steadyrabbit._ops.demo.result import DemoResult, format_summary
from steadyrabbit._ops.demo.run import run_demo
from steadyrabbit._settings import Settings
from tests.conftest import MAIN_URL, Admin, MakeSettings

pytestmark = pytest.mark.anyio

MESSAGES = 20
FAST = (0.03, 0.08)  # seconds per call of the demo's service
RETRY_QUEUES = (".retry.500ms", ".retry.1000ms")


@pytest.fixture
def exchange(queue_name: str) -> Iterator[str]:
    """The demo's exchange for this test; it and the retry queues are deleted after."""
    name = f"{queue_name}.exchange"
    yield name
    with contextlib.suppress(pika.exceptions.AMQPError):
        admin = Admin(MAIN_URL)
        admin.delete(*(queue_name + suffix for suffix in RETRY_QUEUES))
        admin.delete_exchange(name)


class _Terminal(io.StringIO):
    """Output that says it is a terminal: the demo then shows the live view."""

    def isatty(self) -> bool:
        return True


def _exists(admin: Admin, queue: str) -> bool:
    try:
        admin.counts(queue)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return False
        raise
    return True


def _exchange_exists(exchange: str) -> bool:
    with pika.BlockingConnection(pika.URLParameters(MAIN_URL)) as connection:
        try:
            connection.channel().exchange_declare(exchange, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return False
            raise
    return True


def _check_accounts(result: DemoResult) -> None:
    assert result.published == MESSAGES
    assert result.lost == 0
    assert not result.timed_out
    assert result.left_in_queues == 0
    assert result.delivered + result.dead_lettered == result.published
    # Exactly the two poison messages end dead-lettered, each with the service's answer.
    assert len(result.poison) == 2
    assert {d.message_id for d in result.dead_letters} == set(result.poison)
    reasons = [d.reason for d in result.dead_letters]
    assert any(r.startswith("POST ") and "answered 422" in r for r in reasons), reasons
    assert any(r.startswith("gave up after 3 attempts") and "answered 500" in r for r in reasons)
    assert result.retried > 0  # the 500 poison alone is retried twice
    # The cut happened and the worker came back through it: both connections reconnected.
    assert result.cuts == 1
    assert result.reconnects >= 2
    # The message whose acceptance triggered the cut cannot have been acked before it: it is
    # redelivered, and acked without a second POST.
    assert result.duplicates_suppressed >= 1
    assert result.duplicates == 0
    assert result.ok


async def test_demo_survives_the_reset_and_accounts_for_every_message(
    make_settings: MakeSettings, queue_name: str, exchange: str, admin: Admin
) -> None:
    out = io.StringIO()
    result = await run_demo(
        make_settings(),
        out=out,
        messages=MESSAGES,
        concurrency=4,
        service_delay=FAST,
        queue=queue_name,
        exchange=exchange,
        settle_timeout=25,
    )
    _check_accounts(result)
    text = out.getvalue() + format_summary(result)
    assert "CUT: reset 2 connections" in text
    assert "BACK: reconnected after" in text
    assert "every message settled" in text
    assert f"OK: every message is accounted for: {result.delivered} delivered + 2" in text
    assert re.search(r"^  lost +0$", text, re.MULTILINE)
    assert "guest:guest" not in text  # the password, never shown
    assert ":guest@" not in text
    assert "guest:****@" in text
    # Cleaned up: nothing of the demo is left on the broker.
    for queue in (queue_name, f"{queue_name}.dlq", *(queue_name + s for s in RETRY_QUEUES)):
        assert not await admin.run(_exists, admin, queue), queue
    assert not await admin.run(_exchange_exists, exchange)


async def test_leftovers_of_an_interrupted_run_do_not_skew_it_and_keep_leaves_the_queues(
    make_settings: MakeSettings, queue_name: str, exchange: str, admin: Admin
) -> None:
    # What an interrupted run leaves: messages in the queue and its dead-letter queue, and a
    # retry queue that a changed delay would make conflict with the demo's declaration.
    await admin.run(admin.declare, queue_name)
    await admin.run(admin.publish, queue_name, [b"old"] * 5)
    await admin.run(admin.declare, f"{queue_name}.dlq")
    await admin.run(admin.publish, f"{queue_name}.dlq", [b"old dead letter"] * 3)
    await admin.run(admin.declare, f"{queue_name}.retry.500ms", {"x-message-ttl": 12345})
    out = _Terminal()
    result = await run_demo(
        make_settings(),
        out=out,
        messages=MESSAGES,
        concurrency=4,
        service_delay=FAST,
        interval=0.3,
        keep=True,
        queue=queue_name,
        exchange=exchange,
        settle_timeout=25,
    )
    _check_accounts(result)
    # The live view drew frames, each with the demo's own lines under it.
    text = out.getvalue()
    assert text.count("\x1b[H\x1b[2J") >= 2
    assert "demo: delivered" in text
    assert "guest:guest" not in text
    # Kept: the dead letters are still there to look at, the rest is empty.
    assert await admin.run(admin.counts, f"{queue_name}.dlq") == (result.dead_lettered, 0)
    assert await admin.run(admin.counts, queue_name) == (0, 0)
    assert f"steadyrabbit dlq list {queue_name}" in format_summary(result)


async def test_a_queue_with_a_consumer_is_left_alone(
    make_settings: MakeSettings, queue_name: str, exchange: str, admin: Admin
) -> None:
    """Another run (or anything else) consuming the demo's queue: refuse rather than delete it."""
    await admin.run(admin.declare, queue_name)
    await admin.run(admin.publish, queue_name, [b"not the demo's"])
    with pika.BlockingConnection(pika.URLParameters(MAIN_URL)) as connection:
        connection.channel().basic_consume(queue_name, lambda *_: None)
        with pytest.raises(ConfigurationError, match=r"has 1 consumer.*another demo running"):
            await run_demo(
                make_settings(), out=io.StringIO(), queue=queue_name, exchange=exchange
            )
    assert await admin.run(admin.counts, queue_name) == (1, 0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"messages": 0}, "backlog must be 1 to"),
        ({"concurrency": 0}, "concurrency must be 1 to"),
        ({"service_delay": (1.0, 0.5)}, "service delay must be a range"),
        ({"failure_rate": 1.0}, "failure rate must be"),
        ({"cut_after": 1.0}, "cut must come part-way"),
        ({"settle_timeout": 0.0}, "settle timeout must be > 0"),
    ],
)
async def test_bad_options_fail_with_one_sentence(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        await run_demo(Settings(urls=(MAIN_URL,)), out=io.StringIO(), **options)  # type: ignore[arg-type]


async def test_a_tls_broker_is_refused_before_anything_happens() -> None:
    out = io.StringIO()
    with pytest.raises(ConfigurationError, match="give an amqp:// broker URL") as caught:
        await run_demo(Settings(urls=("amqps://user:s3cret@rabbit.example/prod",)), out=out)
    assert "s3cret" not in str(caught.value) + out.getvalue()


def test_the_summary_of_a_failed_run_says_what_is_missing() -> None:
    result = DemoResult(
        queue="q",
        dead_letter_queue="q.dlq",
        published=10,
        delivered=7,
        retried=1,
        dead_lettered=1,
        reconnects=2,
        cuts=1,
        stale_acks_dropped=1,
        duplicates=0,
        duplicated_messages=0,
        duplicates_suppressed=0,
        left_in_queues=1,
        lost=1,
        elapsed=3.0,
        timed_out=True,
        kept=False,
    )
    text = format_summary(result)
    assert not result.ok
    assert "FAILED: timed out waiting" in text
    assert re.search(r"^  still queued +1 ", text, re.MULTILINE)
    assert re.search(r"^  lost +1$", text, re.MULTILINE)


def test_the_demo_command_runs_from_the_command_line() -> None:
    """`steadyrabbit demo`, as the README's quick start runs it (small, piped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEADYRABBIT_")}
    done = subprocess.run(
        [sys.executable, "-m", "steadyrabbit", "demo", "--messages", "8", "--url", MAIN_URL,
         "--log-level", "error"],
        cwd=Path(__file__).resolve().parent.parent, env=env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=100, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CUT: reset" in done.stdout
    assert re.search(r"^  lost +0$", done.stdout, re.M), done.stdout
    assert "OK: every message is accounted for: " in done.stdout
    assert "guest:guest@" not in done.stdout + done.stderr
