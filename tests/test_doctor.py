"""``steadyrabbit doctor`` against real brokers, run as a user runs it (a subprocess).

Most tests use a private node with the management plugin, consumer_timeout 5 s checked every
second; the others use the machine's broker, which has no management plugin. Nothing here is
mocked: the seed-1 setup is staged with a plain pika consumer, and the test checks that the
broker then really closes its channel as doctor predicted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx
import pika
import pika.exceptions
import pytest

from steadyrabbit import App, Message, Worker
from steadyrabbit._leases import SQLiteLeaseStore
from tests._broker import BrokerNode
from tests.conftest import MAIN_URL, Admin, MakeSettings, eventually

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
ERROR_PREFIX = "steadyrabbit: error: "
NODE_CONSUMER_TIMEOUT = 5  # seconds, the private node's consumer_timeout
PASSWORD = "hunter2-doctor-secret"
TIMES = "\N{MULTIPLICATION SIGN}"
SEED1_TITLE = f"unlimited prefetch: prefetch {TIMES} handler duration ≥ consumer_timeout"

needs_node = pytest.mark.private_node


@dataclass(frozen=True)
class Result:
    status: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def json(self) -> dict[str, Any]:
        document = json.loads(self.stdout)
        assert isinstance(document, dict)
        return document

    def marked(self, marker: str) -> list[str]:
        """The checklist lines with this marker."""
        return [line for line in self.stdout.splitlines() if line.startswith(f"{marker} ")]

    @property
    def flat(self) -> str:
        """stdout with runs of whitespace as one space: wrapped details read as one line."""
        return " ".join(self.stdout.split())

    def problems(self) -> list[str]:
        """The warnings and critical findings."""
        return self.marked("!") + self.marked("✗")


def doctor(*args: str, timeout: float = 60) -> Result:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEADYRABBIT_")}
    env["PYTHONIOENCODING"] = "utf-8"
    done = subprocess.run(
        [sys.executable, "-m", "steadyrabbit", "doctor", *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=timeout,
        check=False,
    )
    return Result(done.returncode, done.stdout, done.stderr)


def node_args(node: BrokerNode, *, url: str | None = None) -> list[str]:
    return [
        "--url",
        url or node.url,
        "--management-url",
        node.mgmt_url,
        "--consumer-timeout",
        str(NODE_CONSUMER_TIMEOUT),
        "--connect-timeout",
        "10",
    ]


def unique(prefix: str) -> str:
    return f"doctor-{prefix}-{uuid.uuid4().hex[:8]}"


# -- the private node with the management plugin ----------------------------------------------


@pytest.fixture
def node(private_node: BrokerNode) -> BrokerNode:
    """The session's private node (consumer_timeout 5 s, management plugin)."""
    return private_node


@pytest.fixture
def node_admin(node: BrokerNode) -> Admin:
    return Admin(node.url)


def api(node: BrokerNode, path: str) -> Any:
    response = httpx.get(f"{node.mgmt_url}/api/{path}", auth=("guest", "guest"), timeout=10)
    return response.json() if response.status_code == 200 else None


async def wait_for_stats(
    node: BrokerNode, queue: str, check: Callable[[dict[str, Any]], bool]
) -> None:
    """The management API's statistics lag the broker by up to its collection interval (5 s):
    wait until they show what a test staged, so that doctor sees it too. The API is asked from
    a thread: a worker under test may be running on the event loop."""

    async def ready() -> bool:
        data = await asyncio.to_thread(api, node, f"queues/%2F/{quote(queue, safe='')}")
        return isinstance(data, dict) and check(data)

    await eventually(ready, within=30, what=f"management statistics of {queue}")


class RawConsumer:
    """A plain pika consumer in a thread, as the seed-1 incident wrote it: a blocking handler,
    an ack after it, and whatever prefetch it is given (0 = unlimited)."""

    def __init__(self, url: str, queue: str, *, prefetch: int, handler_seconds: float) -> None:
        self._url = url
        self._queue = queue
        self._prefetch = prefetch
        self._handler_seconds = handler_seconds
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raw-consumer", daemon=True)
        self.errors: list[BaseException] = []

    def __enter__(self) -> RawConsumer:
        self._thread.start()
        assert self._ready.wait(30), "raw consumer did not start"
        if self.errors:
            raise self.errors[0]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        try:
            connection = pika.BlockingConnection(pika.URLParameters(self._url))
        except pika.exceptions.AMQPError as exc:
            self.errors.append(exc)
            self._ready.set()
            return
        try:
            channel = connection.channel()
            channel.basic_qos(prefetch_count=self._prefetch)

            def on_message(
                ch: Any, method: Any, _properties: pika.BasicProperties, _body: bytes
            ) -> None:
                time.sleep(self._handler_seconds)  # the slow REST call
                ch.basic_ack(method.delivery_tag)

            channel.basic_consume(self._queue, on_message)
            self._ready.set()
            while not self._stop.is_set():
                connection.process_data_events(time_limit=0.1)
        except pika.exceptions.AMQPError as exc:
            self.errors.append(exc)
        finally:
            self._ready.set()
            with contextlib.suppress(pika.exceptions.AMQPError):
                if connection.is_open:
                    connection.close()


# -- (a) the seed-1 incident, staged ----------------------------------------------------------


@needs_node
@pytest.mark.slow  # waits out broker timeouts or processes: CI's slow pass
async def test_seed1_unlimited_prefetch_with_slow_handler_is_critical_and_real(
    node: BrokerNode, node_admin: Admin
) -> None:
    """A pika consumer with no prefetch limit and a 2 s handler: doctor names the failure and
    exits 1; then a backlog of 6 makes the broker close that consumer's channel exactly so."""
    queue = unique("seed1")
    node_admin.declare(queue)
    node_admin.declare(f"{queue}.dlq")
    with RawConsumer(node.url, queue, prefetch=0, handler_seconds=2) as consumer:
        await wait_for_stats(node, queue, lambda q: len(q.get("consumer_details") or []) == 1)

        result = doctor(queue, *node_args(node), "--handler-seconds", "2")
        assert result.status == EXIT_FAILURE, result.output
        critical = result.marked("✗")
        assert critical == [f"✗ queue {queue}: 1 consumer with {SEED1_TITLE}"], result.stdout
        assert "PRECONDITION_FAILED" in result.flat
        assert "fix: set prefetch = concurrency on those consumers" in result.flat
        assert "prefetch unlimited, manual ack" in result.flat
        assert result.stderr == ""

        document = doctor(queue, *node_args(node), "--handler-seconds", "2", "--json").json()
        assert document["critical"] is True
        [finding] = [f for f in document["findings"] if f["level"] == "critical"]
        assert finding["check"] == "prefetch-timeout"
        assert finding["queue"] == queue
        [consumer_report] = document["queues"][0]["consumers"]
        assert consumer_report["prefetch"] == 0
        assert consumer_report["channel_prefetch"] in (0, None)  # None: stats not in yet
        assert consumer_report["client"] == "Pika Python Client Library"

        # What doctor predicted, the broker does: 6 messages of 2 s each, all prefetched.
        node_admin.publish(queue, [b"{}"] * 6)
        await eventually(lambda: bool(consumer.errors), within=30, what="channel closed")
    [error] = consumer.errors
    assert isinstance(error, pika.exceptions.ChannelClosedByBroker)
    assert error.reply_code == 406
    assert "PRECONDITION_FAILED" in error.reply_text


@needs_node
async def test_finite_prefetch_deeper_than_the_timeout_is_critical(
    node: BrokerNode, node_admin: Admin
) -> None:
    queue = unique("deep")
    node_admin.declare(queue)
    node_admin.declare(f"{queue}.dlq")
    with RawConsumer(node.url, queue, prefetch=3, handler_seconds=0):
        await wait_for_stats(node, queue, lambda q: len(q.get("consumer_details") or []) == 1)
        deep = doctor(queue, *node_args(node), "--handler-seconds", "2")
        safe = doctor(queue, *node_args(node), "--handler-seconds", "1")
    assert deep.status == EXIT_FAILURE, deep.output
    assert deep.marked("✗") == [
        f"✗ queue {queue}: consumer prefetch 3 {TIMES} handler duration ≥ consumer_timeout"
    ]
    assert "last prefetched message is acked after ~6 s" in deep.flat
    assert safe.status == EXIT_OK, safe.output  # 3 x 1 s < 5 s


@needs_node
def test_handler_longer_than_the_timeout_is_critical(node: BrokerNode) -> None:
    result = doctor(*node_args(node), "--handler-seconds", "7")
    assert result.status == EXIT_FAILURE, result.output
    assert result.marked("✗") == [
        "✗ handler duration 7 s ≥ consumer_timeout 5 s: every delivery times out"
    ]
    half = doctor(*node_args(node), "--handler-seconds", "3")
    assert half.status == EXIT_OK, half.output
    assert half.marked("!") == ["! handler duration 3 s is at least half the consumer_timeout 5 s"]


def test_configured_prefetch_above_concurrency_with_slow_handler_warns(queue_name: str) -> None:
    """steadyrabbit's own worker returns aged prefetched messages, so this is a warning."""
    Admin(MAIN_URL).declare(queue_name)
    Admin(MAIN_URL).declare(f"{queue_name}.dlq")
    args = ["--url", MAIN_URL, "--consumer-timeout", "60", "--concurrency", "2"]
    result = doctor(queue_name, *args, "--prefetch", "20", "--handler-seconds", "5")
    assert result.status == EXIT_OK, result.output
    assert result.marked("!") == [
        "! prefetch 20 with concurrency 2 and handlers of 5 s: the last prefetched message is "
        "acked only after ~50 s, past half the consumer_timeout 60 s"
    ]
    assert "fix: leave --prefetch unset (prefetch = concurrency)" in result.flat


def test_prefetch_0_describes_seed_1s_own_setting(queue_name: str) -> None:
    """--prefetch 0 (unlimited, which run and relay refuse): doctor names the failure, critical
    with a handler duration, a warning without."""
    Admin(MAIN_URL).declare(queue_name)
    Admin(MAIN_URL).declare(f"{queue_name}.dlq")
    args = ["--url", MAIN_URL, "--consumer-timeout", "1800", "--concurrency", "4"]
    args += ["--prefetch", "0"]
    slow = doctor(queue_name, *args, "--handler-seconds", "70")
    assert slow.status == EXIT_FAILURE, slow.output
    assert slow.marked("✗") == [
        "✗ prefetch 0 (unlimited) with handlers of 70 s: a backlog above 100 messages times out"
    ], slow.stdout
    assert "prefetch unlimited (0), concurrency 4" in slow.flat
    assert "any backlog above 100 messages leaves a prefetched message waiting past the " in (
        slow.flat
    )
    assert "PRECONDITION_FAILED" in slow.flat
    assert "fix: set the consumer's prefetch to its concurrency" in slow.flat
    assert slow.stderr == ""
    document = doctor(queue_name, *args, "--handler-seconds", "70", "--json").json()
    assert document["prefetch"] == 0
    [finding] = [f for f in document["findings"] if f["level"] == "critical"]
    assert finding["check"] == "prefetch-timeout"

    unknown = doctor(queue_name, *args)
    assert unknown.status == EXIT_OK, unknown.output
    assert unknown.marked("!") == [
        "! prefetch 0 (unlimited): the broker pushes the whole backlog into the consumer"
    ], unknown.stdout
    assert "Give --handler-seconds" in unknown.flat


# -- (b) heartbeats ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "title"),
    [
        (["--heartbeat", "0"], "! heartbeats are off (negotiated 0): a dead peer goes unnoticed "),
        (
            ["--url", f"{MAIN_URL}?heartbeat=0"],
            "! heartbeats are off (negotiated 0): a dead peer goes unnoticed ",
        ),
        (["--heartbeat", "2"], "! heartbeat 2 s is below 5 s: false alarms"),
    ],
)
def test_heartbeat_off_or_too_short_warns(args: list[str], title: str) -> None:
    if "--url" not in args:
        args = ["--url", MAIN_URL, *args]
    result = doctor(*args)
    assert result.status == EXIT_OK, result.output
    [warning] = result.marked("!")
    assert warning.startswith(title), warning
    if "off" in title:
        assert "fix: use --heartbeat 15 (between 5 and 20 s)" in result.flat
        assert "Too many heartbeats missed" in result.flat


@needs_node
async def test_live_consumer_with_heartbeats_off_warns(node: BrokerNode, node_admin: Admin) -> None:
    queue = unique("nohb")
    node_admin.declare(queue)
    node_admin.declare(f"{queue}.dlq")
    url = f"{node.url}?heartbeat=0"
    with RawConsumer(url, queue, prefetch=1, handler_seconds=0):
        await wait_for_stats(node, queue, lambda q: len(q.get("consumer_details") or []) == 1)
        result = doctor(queue, *node_args(node), "--handler-seconds", "1")
    assert result.status == EXIT_OK, result.output
    assert result.marked("!") == [f"! queue {queue}: 1 consumer with heartbeats off"]
    assert "prefetch 1, manual ack, heartbeats off" in result.flat


# -- (c) dead-letter routes -------------------------------------------------------------------


def test_queue_without_dead_letter_route_warns_without_management(queue_name: str) -> None:
    Admin(MAIN_URL).declare(queue_name)
    result = doctor(queue_name, "--url", MAIN_URL)
    assert result.status == EXIT_OK, result.output
    assert result.marked("!") == [
        f"! queue {queue_name}: no dead-letter route (no {queue_name}.dlq)"
    ]
    assert "could not be seen" in result.flat  # the arguments, without management


@needs_node
async def test_dead_letter_routes_with_management(node: BrokerNode, node_admin: Admin) -> None:
    bare, with_dlx, missing_dlx = unique("bare"), unique("dlx"), unique("gone")
    node_admin.declare(bare)
    node_admin.declare(with_dlx, {"x-dead-letter-exchange": "amq.direct"})
    node_admin.declare(missing_dlx, {"x-dead-letter-exchange": "no-such-exchange"})
    for queue in (bare, with_dlx, missing_dlx):
        await wait_for_stats(node, queue, lambda q: True)
    result = doctor(bare, with_dlx, missing_dlx, *node_args(node))
    assert result.status == EXIT_OK, result.output
    assert result.marked("!") == [
        f"! queue {bare}: no dead-letter route (no {bare}.dlq, no x-dead-letter-exchange)",
        f"! queue {missing_dlx}: its dead-letter exchange no-such-exchange does not exist",
    ]
    assert f"✓ queue {with_dlx}: dead-letters to exchange amq.direct" in result.flat


@needs_node
async def test_x_consumer_timeout_on_a_broker_before_3_12_warns(
    node: BrokerNode, node_admin: Admin
) -> None:
    queue = unique("xct")
    node_admin.declare(queue, {"x-consumer-timeout": 3_600_000})
    node_admin.declare(f"{queue}.dlq")
    await wait_for_stats(node, queue, lambda q: True)
    result = doctor(queue, *node_args(node))
    assert result.status == EXIT_OK, result.output
    assert result.marked("!") == [
        f"! queue {queue}: x-consumer-timeout is ignored by this broker (before RabbitMQ 3.12)"
    ]
    assert "queue argument x-consumer-timeout = 3600000" in result.flat


# -- (d) a healthy setup, with a steadyrabbit worker consuming --------------------------------


@needs_node
async def test_healthy_setup_has_no_warning_and_exits_0(
    node: BrokerNode, node_admin: Admin, make_settings: MakeSettings
) -> None:
    queue = unique("healthy")
    app = App()

    @app.consumer(queue, concurrency=2, prefetch=2)  # a fixed window, to be seen as it is
    def handle(message: Message) -> None:
        time.sleep(0.1)

    args = [
        queue, *node_args(node), "--concurrency", "2", "--prefetch", "2",
        "--handler-seconds", "0.5",
    ]  # fmt: skip

    async with Worker(app, make_settings(node.url, heartbeat=15)):
        await node_admin.run(node_admin.publish, queue, [b"{}"] * 4)
        await wait_for_stats(
            node,
            queue,
            lambda q: [c.get("prefetch_count") for c in q.get("consumer_details") or []] == [2],
        )
        text = await asyncio.to_thread(doctor, *args, "--heartbeat", "15")
        as_json = await asyncio.to_thread(doctor, *args, "--json")
    assert text.status == EXIT_OK, text.output
    assert text.problems() == [], text.stdout
    for line in (
        "✓ heartbeat 15 s: a dead peer is noticed after about 30 s",
        "✓ prefetch 2 = concurrency 2: no message waits unstarted in the worker",
        f"✓ queue {queue}: failures go to {queue}.dlq",
        "✓ no memory or disk alarm",
        "✓ no blocked connections",
        "0 critical findings, 0 warnings",
    ):
        assert line in text.flat, text.stdout
    # One node: the cluster checks say so and judge nothing (no replica is expected).
    assert re.search(r"^✓ single node \S+: no cluster members or queue replicas to check$",
                     text.stdout, re.MULTILINE), text.stdout
    assert " replicas: " not in text.stdout
    assert f"queue {queue} consumer " in text.flat

    # (f) --json parses, with the same verdict and the facts behind it.
    assert as_json.status == EXIT_OK, as_json.output
    document = as_json.json()
    assert document["critical"] is False
    assert document["summary"]["warning"] == 0
    assert document["summary"]["critical"] == 0
    assert document["management"]["available"] is True
    assert document["heartbeat_negotiated"] == 15
    assert document["server"]["product"] == "RabbitMQ"
    assert document["server"]["capabilities"]["publisher_confirms"] is True
    [queue_report] = document["queues"]
    assert queue_report["type"] == "classic"
    assert queue_report["dead_letter_queue_exists"] is True
    assert queue_report["consumer_count"] == 1
    [consumer] = queue_report["consumers"]
    assert consumer["client"] == "steadyrabbit"
    assert consumer["prefetch"] == 2
    assert consumer["ack_required"] is True
    assert consumer["heartbeat"] == 15
    assert document["alarms"] == []
    assert document["blocked_connections"] == []
    [member] = document["nodes"]
    assert member["running"] is True
    assert member["partitions"] == []
    assert [(p["name"], p["role"], p["type"]) for p in queue_report["placements"]] == [
        (queue, "queue", "classic"),
        (f"{queue}.dlq", "dead-letter", "classic"),
    ]
    assert queue_report["placements"][0]["node"] == member["name"]
    assert {f["level"] for f in document["findings"]} <= {"ok", "info"}


# -- (e) the machine's broker, which has no management plugin ---------------------------------


def test_without_management_says_what_it_could_not_check(queue_name: str) -> None:
    Admin(MAIN_URL).declare(queue_name)
    Admin(MAIN_URL).declare(f"{queue_name}.dlq")
    Admin(MAIN_URL).publish(queue_name, [b"one", b"two"])
    result = doctor(queue_name, "--url", MAIN_URL, "--handler-seconds", "1")
    assert result.status == EXIT_OK, result.output
    assert result.problems() == [], result.stdout
    assert (
        "i management API at http://guest:****@127.0.0.1:15672: not available: connection refused"
    ) in result.flat
    assert f"✓ queue {queue_name}: 2 messages ready, 0 consumers" in result.flat
    not_checked = " ".join(result.stdout.split("\nnot checked:\n", 1)[1].split())
    for item in ("unacked counts", "prefetch, ack mode", "retry queues", "alarms", "the cluster"):
        assert item in not_checked, not_checked
    assert "single node" not in result.stdout, "unknown without the management API"

    document = doctor(queue_name, "--url", MAIN_URL, "--json").json()
    assert document["management"]["available"] is False
    assert document["alarms"] is None
    assert document["blocked_connections"] is None
    [queue_report] = document["queues"]
    assert queue_report["messages_ready"] == 2
    assert queue_report["consumers"] is None  # unknown, not "none"
    assert queue_report["type"] is None
    assert document["nodes"] is None
    assert queue_report["placements"] is None


async def test_the_lease_store_and_how_long_runs_are_protected(tmp_path: Path) -> None:
    """The default store, a SQLite file in --state-dir: doctor does not create it (it may run
    as another user than the worker), then reads it once a worker would have. The machine's
    RabbitMQ 3.10 has no per-consumer timeout: long runs are handed off."""
    state = tmp_path / "state"
    path = state / "leases.sqlite3"
    args = ["--url", MAIN_URL, "--state-dir", str(state)]
    fresh = doctor(*args)
    assert fresh.status == EXIT_OK, fresh.output
    assert fresh.problems() == [], fresh.stdout
    assert f"✓ idempotency store sqlite:{path}: not created yet (a worker creates it)" in (
        fresh.stdout
    )
    assert not state.exists(), "doctor created nothing"
    assert "i long runs: handed off before consumer_timeout" in fresh.stdout
    assert "has no per-consumer timeout" in fresh.flat
    assert "for a consumer without max_duration" in fresh.flat

    store = SQLiteLeaseStore(path)
    await store.open()
    try:
        await store.acquire("order-1", "host/1/1/1", 30.0)
        await store.complete("order-1", "host/1/1/1", 3600.0)
        await store.acquire("order-2", "host/1/1/2", 30.0)
    finally:
        await store.close()
    used = doctor(*args)
    assert used.status == EXIT_OK, used.output
    [line] = [line for line in used.stdout.splitlines() if "idempotency store" in line]
    assert re.fullmatch(
        rf"✓ idempotency store sqlite:{re.escape(str(path))}: reachable, 2 records, 1 running, "
        r"the oldest changed \d+ s ago",
        line,
    ), line
    document = doctor(*args, "--json").json()
    assert document["idempotency"]["state"] == "reachable"
    assert (document["idempotency"]["records"], document["idempotency"]["running"]) == (2, 1)
    assert 0 <= document["idempotency"]["oldest_age"] < 60
    assert document["long_runs"].endswith("has no per-consumer timeout)")


def test_a_store_that_does_not_answer_is_critical_in_one_sentence() -> None:
    """A worker with this store would stop at start: critical, the password masked. With
    idempotency off the store still holds the hand-offs' leases, so it is checked all the
    same."""
    url = f"redis://:{PASSWORD}@127.0.0.1:1/0"
    result = doctor("--url", MAIN_URL, "--idempotency-store", url, "--idempotency", "no")
    assert result.status == EXIT_FAILURE, result.output
    assert result.marked("✗") == [
        "✗ idempotency store redis://:****@127.0.0.1:1/0 is not usable: connection refused"
    ], result.stdout
    assert "fix: make the store reachable, or fix --idempotency-store" in result.flat
    assert "i idempotency is off: a copy of a message that completed runs again" in result.stdout
    assert PASSWORD not in result.output
    assert result.stderr == ""


# -- (g) secrets never appear -----------------------------------------------------------------


@needs_node
def test_passwords_never_appear(node: BrokerNode) -> None:
    node.ctl("add_user", "doctor-user", PASSWORD)
    node.ctl("set_permissions", "-p", "/", "doctor-user", ".*", ".*", ".*")
    node.ctl("set_user_tags", "doctor-user", "monitoring")
    url = f"amqp://doctor-user:{PASSWORD}@127.0.0.1:{node.port}/%2F"
    mgmt = node.mgmt_url.replace("http://", f"http://doctor-user:{PASSWORD}@")
    shown = node.mgmt_url.replace("http://", "http://doctor-user:****@")
    runs = {
        "credentials from the broker URL": doctor("--url", url, "--management-url", node.mgmt_url),
        "credentials in --management-url": doctor("--url", url, "--management-url", mgmt),
        "json": doctor("--url", url, "--management-url", node.mgmt_url, "--json"),
        "refused management login": doctor(
            "--url", url, "--management-url", mgmt.replace(PASSWORD, "wrong-" + PASSWORD)
        ),
        "refused broker login": doctor("--url", url.replace(PASSWORD, "wrong-" + PASSWORD)),
    }
    for what, result in runs.items():
        assert PASSWORD not in result.output, what
        assert "****" in result.output, what
    assert runs["refused management login"].status == EXIT_OK
    assert "refused the login of user 'doctor-user'" in runs["refused management login"].flat
    assert f"✓ management API at {shown}" in runs["credentials in --management-url"].flat
    assert runs["json"].json()["management"]["url"] == shown
    refused = runs["refused broker login"]
    assert refused.status == EXIT_FAILURE
    assert refused.stdout == ""
    assert refused.stderr.startswith(ERROR_PREFIX)
    assert refused.stderr.count("\n") == 1

    # The default guest/guest URL: the management URL is shown masked, too.
    guest = doctor(*node_args(node))
    assert f"✓ management API at {node.mgmt_url.replace('http://', 'http://guest:****@')}" in (
        guest.flat
    )
    assert "guest:guest" not in guest.output


# -- (h) configuration errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--url", f"amqp://guest:{PASSWORD}@127.0.0.1:notaport/"], "the port must be a number"),
        (["--url", f"http://guest:{PASSWORD}@127.0.0.1/"], "the scheme must be amqp://"),
        (["--url", MAIN_URL, "--management-url", "ftp://somewhere"], "--management-url"),
        (["--url", MAIN_URL, "--prefetch", "-1"], "--prefetch"),
        (["--url", MAIN_URL, "--handler-seconds", "0"], "--handler-seconds"),
    ],
)
def test_bad_configuration_is_one_line_and_exit_2(args: list[str], says: str) -> None:
    result = doctor(*args)
    assert result.status == EXIT_USAGE, result.output
    assert result.stdout == ""
    assert result.stderr.startswith(ERROR_PREFIX), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert says in result.stderr
    assert PASSWORD not in result.stderr


def test_no_broker_is_one_line_and_exit_1() -> None:
    result = doctor("--url", f"amqp://guest:{PASSWORD}@127.0.0.1:1/", "--connect-timeout", "5")
    assert result.status == EXIT_FAILURE, result.output
    assert result.stderr.startswith(f"{ERROR_PREFIX}no broker answered")
    assert result.stderr.count("\n") == 1
    assert PASSWORD not in result.stderr


# -- (4) alarms and blocked connections: last, it changes the node for a moment ---------------


@pytest.mark.slow
@needs_node
async def test_memory_alarm_and_blocked_connection_are_critical(node: BrokerNode) -> None:
    blocked_connection: pika.BlockingConnection | None = None
    node.ctl("set_vm_memory_high_watermark", "absolute", "10MB")
    try:
        await eventually(
            lambda: any(n.get("mem_alarm") for n in api(node, "nodes") or []),
            within=30,
            what="memory alarm in the management API",
        )
        # A connection that publishes during the alarm is blocked: the broker stops reading it.
        blocked_connection = pika.BlockingConnection(pika.URLParameters(node.url))
        blocked_connection.channel().basic_publish("", "nowhere", b"x")
        await eventually(
            lambda: any(c.get("state") == "blocked" for c in api(node, "connections") or []),
            within=30,
            what="a blocked connection in the management API",
        )
        result = doctor(*node_args(node))
    finally:
        node.ctl("set_vm_memory_high_watermark", "0.4")
        if blocked_connection is not None:
            with contextlib.suppress(pika.exceptions.AMQPError):
                blocked_connection.close()
    assert result.status == EXIT_FAILURE, result.output
    critical = result.marked("✗")
    assert len(critical) == 2, result.stdout
    assert critical[0].startswith("✗ resource alarm: memory alarm on ")
    assert critical[1] == "✗ 1 connection blocked by the broker"
