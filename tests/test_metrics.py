"""The metrics endpoint (``/metrics``, ``/healthz``, ``/readyz``) of a worker, on real brokers.

Requests go over real HTTP from a thread, since the endpoint is served by the worker's own
event loop; the exposition is read back with prometheus_client's own parser.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pika
import pytest
from prometheus_client.parser import text_string_to_metric_families

from steadyrabbit import (
    App,
    BrokerUnreachableError,
    ConfigurationError,
    Message,
    Reject,
    Retry,
    RetryPolicy,
    Worker,
)
from tests._broker import BrokerNode
from tests.conftest import MAIN_URL, Admin, MakeSettings, Settled, eventually

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "metrics-Pa55-d1stinct"


pytestmark = pytest.mark.anyio


@dataclass(frozen=True)
class Response:
    status: int
    body: str
    content_type: str


def http_get(address: tuple[str, int], path: str, method: str = "GET") -> Response:
    connection = http.client.HTTPConnection(*address, timeout=10)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return Response(
            response.status, response.read().decode(), response.getheader("Content-Type", "")
        )
    finally:
        connection.close()


async def get(worker: Worker, path: str, method: str = "GET") -> Response:
    """A request from a thread: the worker's loop (this one) must stay free to answer."""
    address = worker.metrics_address
    assert address is not None, "the metrics endpoint is not serving"
    return await asyncio.to_thread(http_get, address, path, method)


class Samples:
    """The samples of one scrape, parsed by prometheus_client."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self._values[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def __call__(self, name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        assert key in self._values, f"no sample {name}{labels} in:\n{self.text}"
        return self._values[key]

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self._values


async def scrape(worker: Worker) -> Samples:
    response = await get(worker, "/metrics")
    assert response.status == 200, response
    assert response.content_type.startswith("text/plain"), response.content_type
    return Samples(response.body)


# -- counters and the histogram after real traffic ----------------------------------------------


async def test_counters_and_handler_durations_after_handling_messages(
    queue_name: str, admin: Admin, metrics_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    bodies = [b"ok"] * 6 + [b"reject", b"retry", b"boom"]
    admin.publish(queue_name, bodies)
    settled = Settled()
    app = App(retry=RetryPolicy(permanent=(ValueError,)), middleware=[settled])

    @app.consumer(queue_name, concurrency=3)
    async def handle(message: Message) -> None:
        if message.body == b"reject":
            raise Reject("no good")
        if message.body == b"retry":
            raise Retry("later", delay=60)  # waits in its retry queue past the test's end
        if message.body == b"boom":
            raise ValueError("permanent")  # a handler error, dead-lettered at once
        await asyncio.sleep(0.02)

    async with Worker(app, metrics_settings()) as worker:
        await settled.wait_for(9)
        samples = await scrape(worker)
    assert worker.metrics_address is None, "stopped with the worker"
    assert samples("steadyrabbit_messages_delivered_total") == 9
    assert samples("steadyrabbit_messages_acked_total") == 9
    assert samples("steadyrabbit_messages_retried_total") == 1
    assert samples("steadyrabbit_messages_dead_lettered_total") == 2
    assert samples("steadyrabbit_handler_errors_total") == 1
    assert samples("steadyrabbit_stale_acks_dropped_total") == 0
    assert samples("steadyrabbit_messages_requeued_total", reason="aged") == 0
    assert samples("steadyrabbit_reconnects_total", cause="closed_by_broker") == 0
    assert samples("steadyrabbit_event_loop_stalls_total") == 0
    assert samples("steadyrabbit_event_loop_lag_seconds") < 1.0  # below the stall threshold
    queue = {"queue": queue_name}
    # Every handler call is timed, the failing ones too.
    assert samples("steadyrabbit_handler_duration_seconds_count", **queue) == 9
    assert samples("steadyrabbit_handler_duration_seconds_bucket", le="+Inf", **queue) == 9
    assert samples("steadyrabbit_handler_duration_seconds_sum", **queue) >= 6 * 0.02
    assert samples("steadyrabbit_handler_duration_seconds_bucket", le="0.001", **queue) <= 3
    assert samples("steadyrabbit_in_flight_messages", **queue) == 0
    assert samples("steadyrabbit_prefetched_messages", **queue) == 0
    assert samples("steadyrabbit_oldest_unacked_age_seconds", **queue) == 0
    assert samples("steadyrabbit_consumer_ready", **queue) == 1
    assert samples("steadyrabbit_queue_deliveries_total", **queue) == 9
    assert samples("steadyrabbit_queue_messages_total", outcome="succeeded", **queue) == 6
    assert samples("steadyrabbit_queue_messages_total", outcome="retried", **queue) == 1
    assert samples("steadyrabbit_queue_messages_total", outcome="dead_lettered", **queue) == 2
    assert samples("steadyrabbit_consumer_timeout_seconds") == 1800
    assert samples("steadyrabbit_ready") == 1
    for role in ("consume", "publish"):
        assert samples("steadyrabbit_connected", connection=role) == 1
        assert 0 <= samples("steadyrabbit_broker_traffic_age_seconds", connection=role) < 60
        broker = "amqp://guest:****@127.0.0.1:5672/%2F"
        assert samples("steadyrabbit_broker_info", connection=role, broker=broker) == 1
    assert samples.has("process_resident_memory_bytes")
    assert "guest:guest" not in samples.text


async def test_in_flight_and_the_age_of_the_oldest_unacked_delivery(
    queue_name: str, admin: Admin, metrics_settings: MakeSettings
) -> None:
    """One slow handler running, one message waiting in prefetch: both are unacked, and the
    age is that of the oldest delivery, which is what the broker's consumer_timeout measures."""
    admin.declare(queue_name)
    admin.publish(queue_name, [b"slow", b"next"])
    app = App()
    release = asyncio.Event()

    @app.consumer(queue_name, concurrency=1, prefetch=2)
    async def handle(message: Message) -> None:
        if message.body == b"slow":
            await release.wait()

    async with Worker(app, metrics_settings(consumer_timeout=600)) as worker:
        [consumer] = worker.consumers
        await eventually(lambda: consumer.in_flight == 1 and consumer.waiting == 1)
        await asyncio.sleep(0.5)
        during = await scrape(worker)
        release.set()
        await eventually(lambda: worker.stats.acked == 2, what="2 acks")
        after = await scrape(worker)
    queue = {"queue": queue_name}
    assert during("steadyrabbit_in_flight_messages", **queue) == 1
    assert during("steadyrabbit_prefetched_messages", **queue) == 1
    assert 0.5 <= during("steadyrabbit_oldest_unacked_age_seconds", **queue) < 30
    assert during("steadyrabbit_consumer_timeout_seconds") == 600
    assert during("steadyrabbit_handler_duration_seconds_count", **queue) == 0
    assert after("steadyrabbit_in_flight_messages", **queue) == 0
    assert after("steadyrabbit_prefetched_messages", **queue) == 0
    assert after("steadyrabbit_oldest_unacked_age_seconds", **queue) == 0
    assert after("steadyrabbit_handler_duration_seconds_count", **queue) == 2
    assert after("steadyrabbit_handler_duration_seconds_sum", **queue) >= 0.5


async def test_duplicates_suppressed_and_the_leases_held(
    queue_name: str, admin: Admin, metrics_settings: MakeSettings
) -> None:
    """The same order sent twice (same message_id, same body): while the first runs, it holds a
    lease; the second copy is acked without running, and counted, worker-wide and per queue."""
    admin.declare(queue_name)
    order = pika.BasicProperties(delivery_mode=2, message_id="order-1")
    runs: list[bytes] = []
    release = asyncio.Event()
    app = App()

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        runs.append(message.body)
        await release.wait()

    async with Worker(app, metrics_settings()) as worker:
        await admin.run(admin.publish, queue_name, [b"order"], properties=order)
        await eventually(lambda: worker.in_flight == 1, what="the first run")
        during = await scrape(worker)
        release.set()
        await eventually(lambda: worker.stats.acked == 1, what="the first ack")
        await admin.run(admin.publish, queue_name, [b"order"], properties=order)
        await eventually(lambda: worker.stats.acked == 2, what="the copy acked")
        after = await scrape(worker)
    assert runs == [b"order"]
    queue = {"queue": queue_name}
    assert during("steadyrabbit_leases_held") == 1
    assert during("steadyrabbit_duplicates_suppressed_total") == 0
    assert after("steadyrabbit_leases_held") == 0
    assert after("steadyrabbit_duplicates_suppressed_total") == 1
    assert after("steadyrabbit_queue_duplicates_suppressed_total", **queue) == 1
    assert after("steadyrabbit_queue_messages_total", outcome="succeeded", **queue) == 1
    assert after("steadyrabbit_messages_handed_off_total") == 0
    assert after("steadyrabbit_queue_handoffs_total", **queue) == 0
    assert after("steadyrabbit_markers_settled_total") == 0
    assert after("steadyrabbit_queue_markers_settled_total", **queue) == 0


async def test_hand_offs_and_markers(
    queue_name: str, admin: Admin, metrics_settings: MakeSettings
) -> None:
    """A run still going at 60 % of consumer_timeout (2 s, as this worker is told) is handed
    off: a marker goes to the delay queue (lease 1 s) and comes back, to be dropped or delayed
    again; the run holds its lease meanwhile. (The broker's own timeout is far away.)"""
    admin.declare(queue_name)
    app = App()

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        await asyncio.sleep(2.0)

    async with Worker(app, metrics_settings(consumer_timeout=2, lease=1)) as worker:
        await admin.run(admin.publish, queue_name, [b"long"])
        await eventually(lambda: worker.stats.handed_off == 1, what="the hand-off")
        during = await scrape(worker)

        def settled() -> bool:
            # The run is over, and its marker came back and was dropped: nothing waits anywhere.
            return (
                worker.in_flight == 0
                and worker.stats.markers >= 1
                and admin.counts(f"{queue_name}.retry.1000ms")[0] == 0
                and admin.counts(queue_name)[0] == 0
            )

        await eventually(settled, what="the marker dropped")
        after = await scrape(worker)
        markers = worker.stats.markers
    queue = {"queue": queue_name}
    assert during("steadyrabbit_messages_handed_off_total") == 1
    assert during("steadyrabbit_queue_handoffs_total", **queue) == 1
    assert during("steadyrabbit_leases_held") == 1, "a lease of its own, for the hand-off"
    assert after("steadyrabbit_leases_held") == 0
    assert after("steadyrabbit_markers_settled_total") == markers
    assert after("steadyrabbit_queue_markers_settled_total", **queue) == markers
    assert after("steadyrabbit_duplicates_suppressed_total") == 0


async def test_seconds_since_the_last_broker_traffic(
    queue_name: str, admin: Admin, metrics_settings: MakeSettings
) -> None:
    """Without heartbeats an idle connection receives nothing: the age grows; a delivery
    resets it."""
    admin.declare(queue_name)
    app = App()

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        pass

    def age(samples: Samples) -> float:
        return samples("steadyrabbit_broker_traffic_age_seconds", connection="consume")

    async with Worker(app, metrics_settings(heartbeat=0)) as worker:
        await scrape(worker)  # the first look
        await asyncio.sleep(0.6)
        assert age(await scrape(worker)) >= 0.6
        await admin.run(admin.publish, queue_name, [b"traffic"])
        await eventually(lambda: worker.stats.acked == 1, what="the ack")
        assert age(await scrape(worker)) < 0.5


# -- /healthz, /readyz and HTTP details ----------------------------------------------------------


async def test_health_endpoints_and_http_errors(
    queue_name: str, admin: Admin, metrics_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    app = App()

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        pass

    def raw(address: tuple[str, int], request: bytes) -> bytes:
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(request)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)

    async with Worker(app, metrics_settings()) as worker:
        address = worker.metrics_address
        assert address is not None
        assert address[0] == "127.0.0.1", "loopback by default"
        health = await get(worker, "/healthz")
        assert health == Response(200, "ok\n", "text/plain; charset=utf-8")
        assert (await get(worker, "/readyz")).status == 200
        assert (await get(worker, "/readyz?verbose=1")).status == 200
        missing = await get(worker, "/nope")
        assert missing.status == 404
        assert "/metrics" in missing.body
        assert (await get(worker, "/metrics", "POST")).status == 405
        head = await get(worker, "/metrics", "HEAD")
        assert (head.status, head.body) == (200, "")
        garbage = await asyncio.to_thread(raw, address, b"hello\r\n\r\n")
        assert garbage.startswith(b"HTTP/1.1 400 ")
        try:
            huge = await asyncio.to_thread(raw, address, b"GET /" + b"x" * 9000 + b" HTTP/1.1")
        except ConnectionResetError:
            pass  # closed with part of the request unread: the kernel resets
        else:
            assert huge.startswith(b"HTTP/1.1 400 ")
        assert (await get(worker, "/healthz")).status == 200
        # A client that connects and says nothing does not hold up the stop.
        idle = socket.create_connection(address, timeout=10)
        try:
            started = time.monotonic()
            await worker.stop()
            assert time.monotonic() - started < 5
            assert worker.metrics_address is None
        finally:
            idle.close()


async def test_readyz_is_503_with_the_reason_while_no_broker_answers(
    metrics_settings: MakeSettings
) -> None:
    """The endpoint serves from the start of Worker.start, before any connection, and stops
    with the worker when the start fails."""
    app = App()

    @app.consumer("never-consumed")
    async def handle(message: Message) -> None:
        pass

    unreachable = metrics_settings("amqp://guest:guest@127.0.0.1:1/%2F", connect_timeout=3.0)

    worker = Worker(app, unreachable)
    start = asyncio.ensure_future(worker.start())
    await eventually(lambda: worker.metrics_address is not None, what="the endpoint")
    assert (await get(worker, "/healthz")).status == 200
    ready = await get(worker, "/readyz")
    assert ready == Response(
        503, "not ready: not connected to the broker (connecting)\n", ready.content_type
    )
    samples = await scrape(worker)
    assert samples("steadyrabbit_ready") == 0
    assert samples("steadyrabbit_connected", connection="consume") == 0
    assert samples("steadyrabbit_consumer_ready", queue="never-consumed") == 0
    with pytest.raises(BrokerUnreachableError):
        await start
    assert worker.metrics_address is None


async def test_a_metrics_port_in_use_stops_the_worker_before_it_connects(
    metrics_settings: MakeSettings
) -> None:
    app = App()

    @app.consumer("never-consumed")
    async def handle(message: Message) -> None:
        pass

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # No broker there: the port is checked first.
        busy = metrics_settings("amqp://guest:guest@127.0.0.1:1/%2F", metrics_port=port)

        worker = Worker(app, busy)
        with pytest.raises(
            ConfigurationError, match=f"cannot serve metrics on 127.0.0.1:{port}"
        ):
            await worker.start()


def test_metrics_are_off_by_default_and_not_even_imported() -> None:
    code = (
        "import sys, steadyrabbit\n"
        "assert steadyrabbit.Settings().metrics_port is None\n"
        "assert 'prometheus_client' not in sys.modules, 'imported without being asked for'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=30)


# -- recovery: /readyz and the reconnect counter, on the private node --------------------------


@pytest.fixture
def private_user(private_node: BrokerNode) -> Iterator[str]:
    """A user with a distinctive password on the private node; its URL."""
    user = f"metrics-{os.getpid()}"
    private_node.ctl("add_user", user, PASSWORD)
    try:
        private_node.ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        yield f"amqp://{user}:{PASSWORD}@127.0.0.1:{private_node.port}/%2F"
    finally:
        private_node.ctl("delete_user", user)


@pytest.mark.private_node
async def test_readyz_and_reconnects_follow_a_connection_closed_by_the_broker(
    private_node: BrokerNode,
    private_admin: Admin,
    private_user: str,
    metrics_settings: MakeSettings,
) -> None:
    queue = "metrics-readyz"
    private_admin.delete(queue, f"{queue}.dlq")
    app = App()

    @app.consumer(queue)
    async def handle(message: Message) -> None:
        pass

    recovering = metrics_settings(
        urls=(private_user,),
        heartbeat=5,
        # The worker stays down for 1-2 s, long enough to be seen not ready.
        reconnect_delay=2.0,
        reconnect_delay_max=4.0,
    )
    texts: list[str] = []

    try:
        async with Worker(app, recovering) as worker:
            ready = await get(worker, "/readyz")
            assert (ready.status, ready.body) == (200, "ready\n")
            before = await scrape(worker)
            assert before("steadyrabbit_reconnects_total", cause="closed_by_broker") == 0
            texts.append(before.text)
            cut = asyncio.ensure_future(
                asyncio.to_thread(private_node.close_all_connections, "test: metrics")
            )
            unready: list[Response] = []

            async def not_ready() -> bool:
                response = await get(worker, "/readyz")
                texts.append(response.body)
                if response.status == 503:
                    unready.append(response)
                return bool(unready)

            await eventually(not_ready, within=30, what="/readyz to answer 503")
            await cut
            assert unready[0].body.startswith("not ready: "), unready[0]

            async def ready_again() -> bool:
                return (await get(worker, "/readyz")).status == 200

            await eventually(ready_again, within=30, what="/readyz to answer 200 again")
            after = await scrape(worker)
            texts.append(after.text)
            cause = worker.stats.reconnects["closed_by_broker"]
            assert cause >= 1
            assert after("steadyrabbit_reconnects_total", cause="closed_by_broker") == cause
            assert after("steadyrabbit_ready") == 1
            assert after("steadyrabbit_connected", connection="consume") == 1
            user = private_user.split("://")[1].split(":")[0]
            shown = f"amqp://{user}:****@127.0.0.1:{private_node.port}/%2F"
            assert after("steadyrabbit_broker_info", connection="consume", broker=shown) == 1
    finally:
        private_admin.delete(queue, f"{queue}.dlq")
    for text in texts:
        assert PASSWORD not in text


# -- the command line -----------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("STEADYRABBIT_", "SAMPLE_"))}


def steadyrabbit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "steadyrabbit", *args],
        cwd=ROOT,
        env=_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(
            ["--metrics-port", "70000"],
            "--metrics-port: input should be less than or equal to 65535",
            id="range",
        ),
        pytest.param(
            ["--metrics-port", "-1"],
            "--metrics-port: input should be greater than or equal to 0",
            id="negative",
        ),
        pytest.param(["--metrics-port", "web"], "Invalid value for '--metrics-port'", id="word"),
        pytest.param(
            ["--metrics-host", "0.0.0.0"], "--metrics-host needs --metrics-port", id="host"
        ),
    ],
)
@pytest.mark.parametrize("command", ["relay", "run"])
def test_bad_metrics_options_are_one_line_usage_errors(
    command: str, args: list[str], expected: str
) -> None:
    positional = ["q", "http://127.0.0.1:9/"] if command == "relay" else ["tests.sample_app:app"]
    url = f"amqp://guest:{PASSWORD}@127.0.0.1:1/%2F"
    result = steadyrabbit(command, *positional, "--url", url, *args)
    assert result.returncode == 2, result
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("steadyrabbit: error: "), line
    assert expected in line
    assert PASSWORD not in result.stderr


def test_a_metrics_port_in_use_is_one_line_usage_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = steadyrabbit(
            "relay", "q", "http://127.0.0.1:9/", "--url", MAIN_URL, "--metrics-port", str(port)
        )
    assert result.returncode == 2, result
    [line] = result.stderr.splitlines()
    assert line.startswith(f"steadyrabbit: error: cannot serve metrics on 127.0.0.1:{port}: "), line


def start(log: Path, *args: str) -> subprocess.Popen[bytes]:
    """``steadyrabbit ARGS --url MAIN_URL`` in the background; its output goes to ``log``."""
    with log.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "steadyrabbit", *args, "--url", MAIN_URL],
            cwd=ROOT,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


async def test_relay_serves_metrics_on_a_free_port_it_logs(
    queue_name: str, admin: Admin, tmp_path: Path
) -> None:
    log = tmp_path / "relay.log"
    proc = start(log, "relay", queue_name, "http://127.0.0.1:9/", "--metrics-port", "0")
    served = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")
    try:
        ports: list[int] = []

        def logged() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"relay exited early:\n{log.read_text()}")
            match = served.search(log.read_text(errors="replace"))
            if match:
                ports.append(int(match.group(1)))
            return bool(ports)

        await eventually(logged, within=20, what="the metrics address in the log")
        address = ("127.0.0.1", ports[0])

        async def ready() -> bool:
            response = await asyncio.to_thread(http_get, address, "/readyz")
            return response.status == 200

        await eventually(ready, within=20, what="/readyz to answer 200")
        samples = Samples((await asyncio.to_thread(http_get, address, "/metrics")).body)
        assert samples("steadyrabbit_ready") == 1
        assert samples("steadyrabbit_consumer_ready", queue=queue_name) == 1
        assert samples("steadyrabbit_handler_duration_seconds_count", queue=queue_name) == 0
        proc.send_signal(signal.SIGTERM)
        status = await asyncio.to_thread(proc.wait, 15)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    output = log.read_text(errors="replace")
    assert status == 0, output
    assert "Traceback" not in output, output
