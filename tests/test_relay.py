"""End to end: `steadyrabbit relay` as a real subprocess, the local broker, a local web service.

The web service is a ``ThreadingHTTPServer`` in this process; what it does depends on the path
(``/ok``, ``/slow``, ``/fail``, ``/invalid``, ``/hang``, ``/drip``, ``/notfound``; a query
string does not change it). It records every request and wakes
the test through a condition variable when requests arrive, so no test sleeps to wait for
something to happen; broker state is polled with ``eventually``.

Counting note: ``queue.declare-ok`` counts *ready* messages only, so "the queue ends empty" is
checked after the relay exited: by then every unacked message would be back in the queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BufferedIOBase
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pika
import pytest

from steadyrabbit import RetryPolicy, Settings, Worker
from steadyrabbit._ops.relay import relay_app
from tests._broker import close_connections_of
from tests.conftest import MAIN_URL, Admin, eventually

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
SLOW_SECONDS = 2.0
HANG_SECONDS = 120.0  # /hang holds the request this long, unless released at teardown
# /drip answers 200 at once, then its body one byte every DRIP_INTERVAL: no single read waits
# long, the whole answer takes DRIP_BYTES * DRIP_INTERVAL seconds.
DRIP_INTERVAL = 0.5
DRIP_BYTES = 12

REASON = "x-steadyrabbit-reason"
EXCEPTION = "x-steadyrabbit-exception"
FAILED_AT = "x-steadyrabbit-failed-at"
QUEUE_HEADER = "x-steadyrabbit-queue"


# -- the web service ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    arrived_at: float = field(default_factory=time.monotonic)


class WebService:
    """A local HTTP server that records requests and answers according to the path."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._requests: list[Received] = []
        self._active = 0
        self._completed = 0
        self._max_active = 0
        # Set at teardown: /slow and /hang stop waiting, so no handler thread lingers.
        self._release = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="test-web-service",
            daemon=True,
        )
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # what the tests look at

    @property
    def requests(self) -> list[Received]:
        with self._cond:
            return list(self._requests)

    @property
    def max_active(self) -> int:
        with self._cond:
            return self._max_active

    def wait_for_requests(self, count: int, timeout: float = 20) -> list[Received]:
        """Block until at least ``count`` requests arrived (not necessarily answered)."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._requests) >= count, timeout):
                raise AssertionError(
                    f"{len(self._requests)} request(s) arrived within {timeout} s, expected {count}"
                )
            return list(self._requests)

    def wait_for_answers(self, count: int, timeout: float = 20) -> None:
        """Block until at least ``count`` requests have been answered (or abandoned)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._completed >= count, timeout):
                raise AssertionError(
                    f"{self._completed} request(s) answered within {timeout} s, expected {count}"
                )

    # server side

    def _arrived(self, request: Received) -> None:
        with self._cond:
            self._requests.append(request)
            self._active += 1
            self._max_active = max(self._max_active, self._active)
            self._cond.notify_all()

    def _done(self) -> None:
        with self._cond:
            self._active -= 1
            self._completed += 1
            self._cond.notify_all()

    def _answer(self, target: str) -> tuple[int, bytes]:
        path = urlsplit(target).path
        if path == "/ok":
            return 200, b"fine"
        if path == "/busy":  # overloaded once: 503 with Retry-After, then fine
            with self._cond:
                first = sum(r.path == "/busy" for r in self._requests) == 1
            return (503, b"busy, come back later") if first else (200, b"fine now")
        if path == "/slow":
            self._release.wait(SLOW_SECONDS)  # the service's own latency, not a test wait
            return 200, b"fine, eventually"
        if path == "/fail":
            return 500, b"upstream exploded"
        if path == "/invalid":  # echoes the request target, as some error pages do
            return 400, f"invalid request {target}".encode()
        if path == "/hang":
            self._release.wait(HANG_SECONDS)
            return 200, b"too late"
        if path == "/drip":
            return 200, b"d" * DRIP_BYTES
        return 404, b"no such thing here"

    def _drip(self, out: BufferedIOBase, text: bytes) -> None:
        for index in range(len(text)):
            if self._release.wait(DRIP_INTERVAL):
                return
            out.write(text[index : index + 1])
            out.flush()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                headers = {name.lower(): value for name, value in self.headers.items()}
                service._arrived(Received(self.path, headers, body))
                try:
                    status, text = service._answer(self.path)
                    self.send_response(status)
                    if status == 503:
                        self.send_header("Retry-After", "1")
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(text)))
                    self.end_headers()
                    if urlsplit(self.path).path == "/drip":
                        service._drip(self.wfile, text)
                    else:
                        self.wfile.write(text)
                except OSError:
                    pass  # the relay gave up on this request (timeout, killed)
                finally:
                    service._done()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture
def web() -> Iterator[WebService]:
    service = WebService()
    try:
        yield service
    finally:
        service.close()


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port on 127.0.0.1 where nothing listens: bound (so nobody else takes it), no listen()."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


# -- the relay process -------------------------------------------------------------------------


class RelayProcess:
    """``python -m steadyrabbit relay ...`` with stdout and stderr going to a log file."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if k != "STEADYRABBIT_URL"}
        env["PYTHONUNBUFFERED"] = "1"
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "steadyrabbit", "relay", *args, "--url", MAIN_URL],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def running(self) -> bool:
        return self.proc.poll() is None

    def signal(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the relay did not exit within {timeout} s; its output:\n{self.output}"
            ) from None

    async def stop(self, within: float = 15) -> int:
        """SIGTERM, and wait (in a thread) for the exit status."""
        self.signal(signal.SIGTERM)
        return await asyncio.to_thread(self.wait, within)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


StartRelay = Callable[..., RelayProcess]


@pytest.fixture
def start_relay(tmp_path: Path) -> Iterator[StartRelay]:
    """Start relay subprocesses; whatever still runs at the end of the test is killed."""
    started: list[RelayProcess] = []

    def start(queue: str, target: str, *options: str) -> RelayProcess:
        log = tmp_path / f"relay-{len(started)}.log"
        relay = RelayProcess([queue, target, *options], log)
        started.append(relay)
        return relay

    try:
        yield start
    finally:
        for relay in started:
            relay.kill()


async def wait_consuming(admin: Admin, relay: RelayProcess, queue: str) -> None:
    """Wait until the relay's consumer is registered on ``queue`` (the queue must exist)."""

    def consuming() -> bool:
        if not relay.running():
            raise AssertionError(f"the relay exited early; its output:\n{relay.output}")
        return bool(admin.counts(queue)[1] == 1)

    await eventually(consuming, within=20, what=f"the relay to consume {queue!r}")


async def requests(web: WebService, count: int, within: float = 20) -> list[Received]:
    return await asyncio.to_thread(web.wait_for_requests, count, within)


def declare(admin: Admin, queue: str) -> None:
    admin.declare(queue)
    admin.declare(f"{queue}.dlq")


def ready(admin: Admin, queue: str) -> int:
    return admin.counts(queue)[0]


def text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def assert_clean(relay: RelayProcess) -> None:
    output = relay.output
    assert "Traceback" not in output, output
    assert "never retrieved" not in output, output


# -- tests ---------------------------------------------------------------------------------------


async def test_2xx_acks_and_forwards_body_and_headers(
    admin: Admin, queue_name: str, web: WebService, start_relay: StartRelay
) -> None:
    declare(admin, queue_name)
    sent: dict[str, bytes] = {}
    for n in range(3):
        message_id = f"msg-{n}-{uuid.uuid4().hex[:6]}"
        body = json.dumps({"n": n, "text": "Größe ✓", "nested": {"a": [1, 2]}}).encode()
        sent[message_id] = body
        props = pika.BasicProperties(
            content_type="application/json", message_id=message_id, delivery_mode=2
        )
        admin.publish(queue_name, [body], properties=props)

    relay = start_relay(queue_name, web.url("/ok"))
    received = await requests(web, 3)
    await asyncio.to_thread(web.wait_for_answers, 3)
    assert await relay.stop() == 0, relay.output

    assert len(web.requests) == 3
    got: dict[str, bytes] = {}
    for request in received:
        assert request.path == "/ok"
        assert request.headers["content-type"] == "application/json"
        assert request.headers["x-routing-key"] == queue_name
        assert request.headers["x-redelivered"] == "false"
        got[request.headers["x-message-id"]] = request.body
        assert request.headers["idempotency-key"] == request.headers["x-message-id"]
    assert got == sent
    assert ready(admin, queue_name) == 0
    assert ready(admin, f"{queue_name}.dlq") == 0
    assert_clean(relay)


async def test_slow_responses_with_concurrency_2_are_all_acked(
    admin: Admin, queue_name: str, web: WebService, start_relay: StartRelay
) -> None:
    declare(admin, queue_name)
    admin.publish(queue_name, [f"slow {n}".encode() for n in range(4)])

    started = time.monotonic()
    relay = start_relay(queue_name, web.url("/slow"), "--concurrency", "2")
    await requests(web, 4, within=20)
    await asyncio.to_thread(web.wait_for_answers, 4, 20)
    elapsed = time.monotonic() - started
    assert await relay.stop() == 0, relay.output

    assert sorted(r.body for r in web.requests) == [f"slow {n}".encode() for n in range(4)]
    for request in web.requests:  # published without properties
        assert request.headers["content-type"] == "application/octet-stream"
        assert "x-message-id" not in request.headers
    assert web.max_active == 2  # two at a time, never more
    assert elapsed >= 2 * SLOW_SECONDS  # 4 messages, 2 at a time, 2 s each
    assert ready(admin, queue_name) == 0
    assert ready(admin, f"{queue_name}.dlq") == 0
    assert_clean(relay)


@pytest.mark.parametrize(
    ("path", "options", "expected"),
    [
        pytest.param(
            "/fail", ("--max-attempts", "1"), ("answered 500", "upstream exploded"), id="500"
        ),
        pytest.param("/notfound", (), ("answered 404", "no such thing here"), id="404"),
        pytest.param(
            "/hang", ("--timeout", "1", "--max-attempts", "1"), ("timed out after 1 s",),
            id="timeout",
        ),
        pytest.param(None, ("--max-attempts", "1"), ("failed: ConnectError",), id="target-down"),
    ],
)
async def test_failure_dead_letters_once(
    admin: Admin,
    queue_name: str,
    web: WebService,
    dead_port: int,
    start_relay: StartRelay,
    path: str | None,
    options: tuple[str, ...],
    expected: tuple[str, ...],
) -> None:
    declare(admin, queue_name)
    body = b'{"order": 42}'
    props = pika.BasicProperties(
        content_type="application/json",
        message_id="order-42",
        headers={"x-origin": "test"},
        delivery_mode=2,
    )
    admin.publish(queue_name, [body], properties=props)
    target = web.url(path) if path is not None else f"http://127.0.0.1:{dead_port}/down"

    relay = start_relay(queue_name, target, *options)
    await eventually(
        lambda: ready(admin, f"{queue_name}.dlq") == 1,
        within=20,
        what="the message in the dead-letter queue",
    )
    assert await relay.stop() == 0, relay.output

    assert ready(admin, queue_name) == 0  # acked after dead-lettering, not requeued
    if path is not None:
        assert [r.path for r in web.requests] == [path]  # exactly one attempt, no retry loop
    else:
        assert web.requests == []
    [(dead_props, dead_body)] = admin.drain(f"{queue_name}.dlq")
    assert dead_body == body
    assert dead_props.message_id == "order-42"
    assert dead_props.content_type == "application/json"
    headers = dead_props.headers or {}
    reason = text(headers[REASON])
    for part in expected:
        assert part in reason, reason
    assert target in reason
    assert text(headers[QUEUE_HEADER]) == queue_name
    assert text(headers[EXCEPTION])
    assert text(headers[FAILED_AT])
    assert text(headers["x-origin"]) == "test"  # the original headers are kept
    assert_clean(relay)


async def test_target_password_and_query_token_never_shown(
    admin: Admin, queue_name: str, web: WebService, start_relay: StartRelay
) -> None:
    password = "hunter2-secret"
    token = "qtoken-5ec12e7"
    declare(admin, queue_name)
    admin.publish(queue_name, [b"with credentials"])
    target = web.url(f"/invalid?token={token}").replace("http://", f"http://hook:{password}@")

    # Debug logs: httpx then logs every request with its URL.
    relay = start_relay(queue_name, target, "--max-attempts", "1", "--log-level", "debug")
    [request] = await requests(web, 1)
    await eventually(
        lambda: ready(admin, f"{queue_name}.dlq") == 1, within=20, what="the dead letter"
    )
    assert await relay.stop() == 0, relay.output

    assert request.headers["authorization"].startswith("Basic ")  # credentials were used
    assert request.path == f"/invalid?token={token}"  # and the token
    [(props, _)] = admin.drain(f"{queue_name}.dlq")
    reason = text((props.headers or {})[REASON])
    assert "hook:****@127.0.0.1" in reason, reason
    assert "/invalid?token=****" in reason, reason
    assert "HTTP Request: POST http://hook:****@127.0.0.1" in relay.output, relay.output
    for secret in (password, token):
        assert secret not in str(props), props
        assert secret not in relay.output, relay.output
    assert_clean(relay)


SECRET = "SECRETVALUE-4f7a1c"
SECRET_PASSWORD = "hook-pw-93b2e0"
SECRET_USER_TOKEN = "ghp-usertoken-61d8"


async def test_target_secrets_never_reach_logs_or_dead_letters(
    admin: Admin,
    queue_name: str,
    web: WebService,
    dead_port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Relays run in this process, every logger at DEBUG, against targets with a query token
    (and a password or a token as user info): one answers 400 with the URL in its body (dead
    letter), one 500 with the URL (retried, then dead-lettered), one is unreachable, one never
    answers in time. No log line and no header of any dead letter holds a secret."""
    secrets = (SECRET, SECRET_PASSWORD, SECRET_USER_TOKEN)
    base = f"127.0.0.1:{web.port}"
    cases = {
        "rejected": (
            f"http://hook:{SECRET_PASSWORD}@{base}/invalid?token={SECRET}&user=operator",
            "answered 400: invalid request /invalid?token=****&user=****",
        ),
        "failing": (
            f"http://{SECRET_USER_TOKEN}@{base}/fail?token={SECRET}",
            "answered 500: upstream exploded",
        ),
        "unreachable": (
            f"http://127.0.0.1:{dead_port}/hook?token={SECRET}#{SECRET}",
            "failed: ConnectError",
        ),
        "hanging": (f"http://{base}/hang?token={SECRET}", "timed out after 1 s"),
    }
    queues = {case: f"{queue_name}-{case}" for case in cases}
    for queue in queues.values():
        declare(admin, queue)
        admin.publish(queue, [b"order 42"])
    settings = Settings(urls=(MAIN_URL,), connect_timeout=10.0, name="relay-secrets-test")
    caplog.set_level(logging.DEBUG)
    try:
        async with AsyncExitStack() as workers:
            for case, (target, _) in cases.items():
                app = relay_app(
                    queues[case], target, timeout=1.0,
                    retry=RetryPolicy(max_attempts=2, delays=(0.1,)),
                )  # fmt: skip
                await workers.enter_async_context(Worker(app, settings))
            for queue in queues.values():
                await eventually(
                    lambda queue=queue: ready(admin, f"{queue}.dlq") == 1,
                    within=20,
                    what=f"the dead letter of {queue}",
                )
        for case, (_, expected) in cases.items():
            [(props, body)] = admin.drain(f"{queues[case]}.dlq")
            assert body == b"order 42"
            headers = props.headers or {}
            reason = text(headers[REASON])
            assert expected in reason, reason
            assert "token=****" in reason, reason
            stored = repr(props) + repr(headers) + "".join(map(text, headers.values()))
            for secret in secrets:
                assert secret not in stored, (case, stored)
        logged = caplog.text
        assert "HTTP Request: POST http://" in logged  # httpx's own line is there, masked
        assert "dead-lettered" in logged
        for secret in secrets:
            leaks = [line for line in logged.splitlines() if secret in line]
            assert not leaks, leaks
    finally:
        for queue in queues.values():
            admin.delete(queue, f"{queue}.dlq", f"{queue}.retry.100ms")


@pytest.mark.parametrize(
    ("concurrency", "prefetch"),
    [
        pytest.param(2, 2, id="all-prefetched-running"),
        pytest.param(1, 3, id="prefetched-waiting"),  # 2 wait unstarted: returned at once
    ],
)
async def test_sigterm_lets_requests_in_flight_finish_and_returns_the_rest(
    admin: Admin,
    queue_name: str,
    web: WebService,
    start_relay: StartRelay,
    concurrency: int,
    prefetch: int,
) -> None:
    declare(admin, queue_name)
    bodies = [f"job {n}".encode() for n in range(5)]
    admin.publish(queue_name, bodies)

    relay = start_relay(
        queue_name,
        web.url("/slow"),
        "--concurrency", str(concurrency),
        "--prefetch", str(prefetch),
        "--grace-period", "10",
    )  # fmt: skip
    in_flight = await requests(web, concurrency)
    if prefetch > concurrency:
        # The rest of the prefetch window has reached the relay (unacked) before the signal.
        await eventually(
            lambda: ready(admin, queue_name) == len(bodies) - prefetch,
            within=10,
            what="the prefetch window to be delivered",
        )
    sent_at = time.monotonic()
    relay.signal(signal.SIGTERM)
    status = await asyncio.to_thread(relay.wait, 10)
    took = time.monotonic() - sent_at
    assert status == 0, relay.output
    assert took < 10, f"took {took:.1f} s, more than the grace period"

    assert len(web.requests) == concurrency  # nothing was started after the signal
    await asyncio.to_thread(web.wait_for_answers, concurrency, 5)
    assert ready(admin, f"{queue_name}.dlq") == 0
    assert ready(admin, queue_name) == len(bodies) - concurrency  # those in flight were acked
    rest = [body for _, body in admin.drain(queue_name)]
    assert sorted(rest + [r.body for r in in_flight]) == sorted(bodies)  # nothing lost
    assert "stopping gracefully" in relay.output
    assert_clean(relay)


async def test_second_sigterm_stops_at_once_and_the_message_comes_back(
    admin: Admin, queue_name: str, web: WebService, start_relay: StartRelay
) -> None:
    declare(admin, queue_name)
    admin.publish(queue_name, [b"stuck"])

    relay = start_relay(queue_name, web.url("/hang"), "--timeout", "60", "--grace-period", "30")
    await requests(web, 1)
    relay.signal(signal.SIGTERM)
    # The first signal must be handled before the second is sent (signals can coalesce).
    await eventually(
        lambda: "stopping gracefully" in relay.output or not relay.running(),
        within=10,
        what="the relay to log the graceful stop",
    )
    assert relay.running(), relay.output  # still waiting for the hanging request
    sent_at = time.monotonic()
    relay.signal(signal.SIGTERM)
    status = await asyncio.to_thread(relay.wait, 10)
    took = time.monotonic() - sent_at
    assert status == 1, relay.output
    assert took < 5, f"took {took:.1f} s to stop after the second signal"

    await eventually(
        lambda: ready(admin, queue_name) == 1, within=10, what="the message back in the queue"
    )
    assert ready(admin, f"{queue_name}.dlq") == 0
    assert len(web.requests) == 1
    assert "Traceback" not in relay.output, relay.output


async def test_exchange_binding_routes_matching_messages(
    admin: Admin, queue_name: str, web: WebService, start_relay: StartRelay
) -> None:
    exchange = f"sr-test-ex-{uuid.uuid4().hex[:8]}"
    routing_key = "purchasing.system.contract"
    declare(admin, queue_name)
    try:
        relay = start_relay(
            queue_name, web.url("/ok"), "--exchange", exchange, "--routing-key", routing_key
        )
        await wait_consuming(admin, relay, queue_name)  # bound by now: the binding comes first
        admin.publish(queue_name, [b"not for us"], exchange=exchange, routing_key="purchasing.x")
        admin.publish(queue_name, [b"contract signed"], exchange=exchange, routing_key=routing_key)
        [request] = await requests(web, 1)
        await asyncio.to_thread(web.wait_for_answers, 1)
        assert await relay.stop() == 0, relay.output

        assert request.path == "/ok"
        assert request.body == b"contract signed"
        assert request.headers["x-routing-key"] == routing_key
        assert len(web.requests) == 1
        assert ready(admin, queue_name) == 0
        assert ready(admin, f"{queue_name}.dlq") == 0
        assert_clean(relay)
    finally:
        admin.delete_exchange(exchange)


async def test_a_server_error_is_retried_then_dead_lettered(
    admin: Admin, queue_name: str, web: WebService, start_relay: StartRelay
) -> None:
    declare(admin, queue_name)
    admin.publish(queue_name, [b"keeps failing"])

    relay = start_relay(
        queue_name, web.url("/fail"), "--max-attempts", "3", "--retry-delay", "0.2,0.4"
    )
    await eventually(
        lambda: ready(admin, f"{queue_name}.dlq") == 1, within=20, what="the dead letter"
    )
    assert await relay.stop() == 0, relay.output

    assert [r.path for r in web.requests] == ["/fail"] * 3
    [(props, body)] = admin.drain(f"{queue_name}.dlq")
    headers = props.headers or {}
    assert body == b"keeps failing"
    assert headers["x-steadyrabbit-attempts"] == 3
    assert text(headers[REASON]).startswith("gave up after 3 attempts: POST ")
    assert ready(admin, queue_name) == 0
    admin.delete(f"{queue_name}.retry.200ms", f"{queue_name}.retry.400ms")
    assert_clean(relay)


async def test_retry_after_is_honoured(
    admin: Admin, queue_name: str, web: WebService, start_relay: StartRelay
) -> None:
    declare(admin, queue_name)
    admin.publish(queue_name, [b"try me later"])

    relay = start_relay(queue_name, web.url("/busy"), "--retry-delay", "0.1")
    first, second = await requests(web, 2)
    await asyncio.to_thread(web.wait_for_answers, 2)
    await eventually(lambda: ready(admin, queue_name) == 0, what="the ack")
    assert await relay.stop() == 0, relay.output

    assert second.arrived_at - first.arrived_at >= 0.95, "Retry-After: 1 was honoured"
    assert ready(admin, f"{queue_name}.dlq") == 0
    admin.delete(f"{queue_name}.retry.1000ms", f"{queue_name}.retry.100ms")
    assert_clean(relay)


async def test_a_client_error_is_not_retried(
    admin: Admin, queue_name: str, web: WebService, start_relay: StartRelay
) -> None:
    declare(admin, queue_name)
    admin.publish(queue_name, [b"malformed order"])

    relay = start_relay(queue_name, web.url("/notfound"), "--max-attempts", "5")
    await eventually(
        lambda: ready(admin, f"{queue_name}.dlq") == 1, within=20, what="the dead letter"
    )
    assert await relay.stop() == 0, relay.output
    assert len(web.requests) == 1
    [(props, _)] = admin.drain(f"{queue_name}.dlq")
    assert (props.headers or {})["x-steadyrabbit-attempts"] == 1
    assert_clean(relay)


async def test_the_timeout_bounds_the_whole_request_not_each_read(
    admin: Admin, queue_name: str, web: WebService, start_relay: StartRelay
) -> None:
    """/drip never lets one read wait 1 s but takes 6 s in all: --timeout 1 gives up after
    about 1 s on each attempt, and the message is retried, then dead-lettered as timed out."""
    declare(admin, queue_name)
    admin.publish(queue_name, [b"slow drip"])
    drip_total = DRIP_BYTES * DRIP_INTERVAL

    relay = start_relay(
        queue_name, web.url("/drip"), "--timeout", "1", "--max-attempts", "2",
        "--retry-delay", "0.1",
    )  # fmt: skip
    first, second = await requests(web, 2, within=drip_total + 10)
    await eventually(
        lambda: ready(admin, f"{queue_name}.dlq") == 1, within=drip_total, what="the dead letter"
    )
    gave_up_at = time.monotonic()
    assert await relay.stop() == 0, relay.output

    assert second.arrived_at - first.arrived_at < 3, "the first attempt held its slot too long"
    assert gave_up_at - second.arrived_at < 3, "the second attempt held its slot too long"
    [(props, body)] = admin.drain(f"{queue_name}.dlq")
    assert body == b"slow drip"
    reason = text((props.headers or {})[REASON])
    assert reason.startswith("gave up after 2 attempts: POST "), reason
    assert "timed out after 1 s" in reason, reason
    assert ready(admin, queue_name) == 0
    admin.delete(f"{queue_name}.retry.100ms")
    assert_clean(relay)


async def test_every_retry_carries_the_original_routing_key(
    admin: Admin, queue_name: str, web: WebService, start_relay: StartRelay
) -> None:
    """Issue 8.14: the first call said X-Routing-Key: purchasing.system.contract, every retry
    the queue name (the retry came back through the default exchange)."""
    exchange = f"sr-test-ex-{uuid.uuid4().hex[:8]}"
    routing_key = "purchasing.system.contract"
    declare(admin, queue_name)
    try:
        relay = start_relay(
            queue_name, web.url("/fail"), "--exchange", exchange, "--routing-key", routing_key,
            "--max-attempts", "3", "--retry-delay", "0.2",
        )
        await wait_consuming(admin, relay, queue_name)
        admin.publish(queue_name, [b"contract"], exchange=exchange, routing_key=routing_key)
        await eventually(
            lambda: ready(admin, f"{queue_name}.dlq") == 1, within=20, what="the dead letter"
        )
        assert await relay.stop() == 0, relay.output
        assert [r.headers["x-routing-key"] for r in web.requests] == [routing_key] * 3
        assert [r.headers["x-redelivered"] for r in web.requests] == ["false"] * 3
        assert_clean(relay)
    finally:
        admin.delete_exchange(exchange)
        admin.delete(f"{queue_name}.retry.200ms")


@pytest.mark.slow
async def test_connection_kills_every_second_cause_no_duplicate_post(
    admin: Admin, queue_name: str, web: WebService, start_relay: StartRelay
) -> None:
    """50 messages to a target that takes 2 s; the relay's broker connections are closed every
    second for 20 s. Acks die with the connections and the broker redelivers, but no message is
    POSTed twice: a copy of a completed one is acked without a request, one whose request is
    still running waits for it. Every request carries the Idempotency-Key header."""
    declare(admin, queue_name)
    ids = [f"order-{n}-{uuid.uuid4().hex[:6]}" for n in range(50)]
    with pika.BlockingConnection(pika.URLParameters(admin.url)) as connection:
        channel = connection.channel()
        for message_id in ids:
            channel.basic_publish(
                "",
                queue_name,
                message_id.encode(),
                pika.BasicProperties(delivery_mode=2, message_id=message_id),
            )
    relay = start_relay(queue_name, web.url("/slow"), "--concurrency", "10")
    await wait_consuming(admin, relay, queue_name)
    kills = 0
    for _ in range(20):
        await asyncio.sleep(1)
        kills += await asyncio.to_thread(close_connections_of, relay.proc.pid, "test: kill")
    await eventually(
        lambda: {r.headers.get("idempotency-key") for r in web.requests} >= set(ids),
        within=60,
        what="a request for every message",
    )
    await eventually(lambda: ready(admin, queue_name) == 0, what="the queue empty")
    await asyncio.to_thread(web.wait_for_answers, len(web.requests), 10)
    assert await relay.stop() == 0, relay.output
    keys = [r.headers.get("idempotency-key") or "(none)" for r in web.requests]
    assert kills >= 10
    assert sorted(keys) == sorted(ids), "a message was POSTed twice, or without its key"
    assert ready(admin, f"{queue_name}.dlq") == 0
