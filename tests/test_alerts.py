"""Alerts: against the machine's broker, a local SMTP server (aiosmtpd) and a local HTTP server.

Each alert must arrive once per group, carry the queue, the error and a cut body, and never a
credential: the SMTP password, the webhook's user info, path and token, or a broker password.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import email.utils
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from steadyrabbit import (
    AlertSettings,
    App,
    ConfigurationError,
    Message,
    RetryPolicy,
    Settings,
    Worker,
)
from steadyrabbit._alert_book import (
    CONSUMER_TIMEOUT,
    DEAD_LETTERED,
    LOOP_BLOCKED,
    RECONNECTS,
    STUCK,
    AlertBook,
    AlertEvent,
    ReconnectCounter,
)
from steadyrabbit._alert_settings import parse_smtp_url
from steadyrabbit._alerts import Alerter, _secrets_of
from steadyrabbit._url import scrub
from tests._broker import BrokerNode, close_main_broker_connections
from tests.conftest import MAIN_URL, Admin, MakeSettings, eventually

pytestmark = pytest.mark.anyio

SMTP_USER = "alert-bot"
SMTP_PASSWORD = "smtp-Pw-7f3a9c"  # distinctive: must never show up in a mail or a log line
HOOK_PASSWORD = "hook-Pw-51d0e2"
HOOK_PATH_SECRET = "T0KEN-PATH-88ab"
HOOK_TOKEN = "qtoken-c0ffee42"
BROKER_PASSWORD = "broker-Pw-9e1b7d"  # inside an exception message: masked in the alert
ROOT = Path(__file__).resolve().parent.parent
SECRETS = (SMTP_PASSWORD, HOOK_PASSWORD, HOOK_PATH_SECRET, HOOK_TOKEN, BROKER_PASSWORD)


# -- a local SMTP server with AUTH, and a local HTTP server ------------------------------------


@dataclass
class Mailbox:
    mails: list[EmailMessage] = field(default_factory=list)
    logins: list[tuple[str, str]] = field(default_factory=list)
    controller: Controller | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"smtp://{SMTP_USER}:{SMTP_PASSWORD}@127.0.0.1:{self.port}"


class _MailHandler:
    def __init__(self, box: Mailbox) -> None:
        self._box = box

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert session.authenticated, "the alerter must log in when the URL has a user"
        content = envelope.original_content or b""
        mail = email.message_from_bytes(content, policy=email.policy.default)
        assert isinstance(mail, EmailMessage)
        self._box.mails.append(mail)
        return "250 OK"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox()

    def authenticate(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        login = (data.login.decode(), data.password.decode())
        box.logins.append(login)
        return AuthResult(success=login == (SMTP_USER, SMTP_PASSWORD))

    box.port = _free_port()
    controller = Controller(
        _MailHandler(box),
        hostname="127.0.0.1",
        port=box.port,
        authenticator=authenticate,
        auth_require_tls=False,  # plain SMTP on localhost: the test reads the mails
    )
    controller.start()
    box.controller = controller
    try:
        yield box
    finally:
        controller.stop()


@dataclass
class Hook:
    posts: list[dict[str, Any]] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    authorizations: list[str] = field(default_factory=list)
    status: int = 200
    port: int = 0

    @property
    def url(self) -> str:
        return (
            f"http://hook:{HOOK_PASSWORD}@127.0.0.1:{self.port}/hooks/{HOOK_PATH_SECRET}"
            f"?token={HOOK_TOKEN}"
        )


@pytest.fixture
def hook() -> Iterator[Hook]:
    state = Hook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            state.raw.append(body)
            state.posts.append(json.loads(body))
            state.authorizations.append(self.headers.get("Authorization", ""))
            self.send_response(state.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# -- helpers ----------------------------------------------------------------------------------


WorkerSettings = Callable[..., Settings]


@pytest.fixture
def worker_settings(make_settings: MakeSettings) -> WorkerSettings:
    """``make_settings`` for an alerting worker on the machine's broker: a name of its own,
    reconnects from 0.1 s up to 0.5 s; the keyword arguments are its ``AlertSettings``."""

    def make(**alerts: Any) -> Settings:
        return make_settings(
            reconnect_delay=0.1,
            reconnect_delay_max=0.5,
            name=f"alerts-test-{uuid.uuid4().hex[:8]}",
            alerts=AlertSettings(**alerts),
        )

    return make


def both(mailbox: Mailbox, hook: Hook, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "smtp_url": mailbox.url,
        "email_from": "steadyrabbit@example.test",
        "email_to": ("ops@example.test", "oncall@example.test"),
        "webhook_url": hook.url,
        "group_wait": 0.5,
        "repeat_interval": 60.0,
    }
    values.update(overrides)
    return values


def assert_no_secrets(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} leaked into: {text[:300]!r}"


def mail_text(mail: EmailMessage) -> str:
    return mail.as_string()


def failing_app(queue: str, errors: dict[bytes, type[Exception]] | None = None) -> App:
    """Every message fails for good: ValueError, or by its body's first byte in ``errors``."""
    app = App(retry=RetryPolicy(permanent=(ValueError, TypeError)))

    @app.consumer(queue, concurrency=4)
    def handle(message: Message) -> None:
        kind = (errors or {}).get(message.body[:1], ValueError)
        raise kind(f"cannot reach amqp://svc:{BROKER_PASSWORD}@db.internal/x for this one")

    return app


# -- 1. one group, once -----------------------------------------------------------------------


async def test_dead_letters_with_one_error_send_one_mail_and_one_post_per_group(
    admin: Admin, queue_name: str, mailbox: Mailbox, hook: Hook, worker_settings: WorkerSettings
) -> None:
    admin.declare(queue_name)
    bodies = [b"{" + b"x" * 1000 + str(i).encode() + b"}" for i in range(5)]
    admin.publish(queue_name, bodies)
    settings = worker_settings(**both(mailbox, hook, group_wait=1.0, body_chars=50))
    async with Worker(failing_app(queue_name), settings) as worker:
        await eventually(lambda: worker.stats.dead_lettered == 5, within=15, what="dead letters")
        await eventually(lambda: bool(hook.posts) and bool(mailbox.mails), within=10,
                         what="the alert")
        await asyncio.sleep(1.0)  # anything sent twice would arrive by now
    assert len(hook.posts) == 1
    assert len(mailbox.mails) == 1
    post = hook.posts[0]
    [group] = post["groups"]
    assert group["kind"] == DEAD_LETTERED
    assert group["queue"] == queue_name
    assert group["count"] == 5
    assert group["error_type"] == "ValueError"
    assert group["error"].startswith("ValueError: cannot reach amqp://svc:****@db.internal/x")
    assert group["follow_up"] is False
    preview = group["body_preview"]
    assert preview.startswith("{xxxx")
    assert preview.endswith("...")
    assert len(preview) <= 50
    assert post["worker"]["name"] == settings.name
    assert isinstance(post["worker"]["pid"], int)
    assert hook.authorizations == ["Basic " + _b64(f"hook:{HOOK_PASSWORD}")]

    mail = mailbox.mails[0]
    assert mailbox.logins == [(SMTP_USER, SMTP_PASSWORD)]
    assert mail["To"] == "ops@example.test, oncall@example.test"
    assert mail["Date"] is not None, "RFC 5322 requires a Date header"
    sent_at = email.utils.parsedate_to_datetime(str(mail["Date"]))
    assert sent_at.tzinfo is not None
    assert abs((datetime.now(UTC) - sent_at).total_seconds()) < 60
    assert re.fullmatch(r"<[^<>@\s]+@[^<>@\s]+>", str(mail["Message-ID"])), mail["Message-ID"]
    assert "dead_lettered" in mail["Subject"]
    text = mail.get_content()
    assert f"queue '{queue_name}'" in text
    assert "count:  5" in text
    assert "amqp://svc:****@db.internal" in text
    assert preview in text
    assert_no_secrets(mail_text(mail), hook.raw[0].decode())


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


# -- 2. two errors, two groups ----------------------------------------------------------------


async def test_two_errors_make_two_groups_in_one_notification(
    admin: Admin, queue_name: str, mailbox: Mailbox, hook: Hook, worker_settings: WorkerSettings
) -> None:
    admin.declare(queue_name)
    admin.publish(queue_name, [b"v1", b"t1", b"v2", b"t2", b"t3"])
    app = failing_app(queue_name, {b"v": ValueError, b"t": TypeError})
    async with Worker(app, worker_settings(**both(mailbox, hook, group_wait=1.0))) as worker:
        await eventually(lambda: worker.stats.dead_lettered == 5, within=15, what="dead letters")
        await eventually(lambda: bool(hook.posts) and bool(mailbox.mails), within=10,
                         what="the alert")
        await asyncio.sleep(0.8)
    assert len(hook.posts) == 1
    assert len(mailbox.mails) == 1
    counts = {g["error_type"]: g["count"] for g in hook.posts[0]["groups"]}
    assert counts == {"ValueError": 2, "TypeError": 3}
    text = mailbox.mails[0].get_content()
    assert "type:   ValueError" in text
    assert "type:   TypeError" in text


# -- 3. muting and the follow-up --------------------------------------------------------------


async def test_a_notified_group_is_muted_then_followed_up_once_with_the_count(
    admin: Admin, queue_name: str, hook: Hook, worker_settings: WorkerSettings
) -> None:
    admin.declare(queue_name)
    admin.publish(queue_name, [b"a", b"b"])
    alerts = {"webhook_url": hook.url, "group_wait": 0.2, "repeat_interval": 2.5}
    async with Worker(failing_app(queue_name), worker_settings(**alerts)) as worker:
        await eventually(lambda: bool(hook.posts), within=15, what="the first alert")
        first_at = time.monotonic()
        assert hook.posts[0]["groups"][0]["count"] == 2
        await admin.run(admin.publish, queue_name, [b"c", b"d", b"e"])
        await eventually(lambda: worker.stats.dead_lettered == 5, within=15, what="dead letters")
        await asyncio.sleep(0.3)
        assert len(hook.posts) == 1, "a muted group must not alert again"
        await eventually(lambda: len(hook.posts) == 2, within=10, what="the follow-up")
        waited = time.monotonic() - first_at
        await asyncio.sleep(0.5)
    assert waited >= 2.0, f"the follow-up came {waited:.1f} s after the alert, inside the mute"
    assert len(hook.posts) == 2
    [group] = hook.posts[1]["groups"]
    assert group["count"] == 3
    assert group["follow_up"] is True
    assert group["queue"] == queue_name


async def test_pending_groups_are_sent_when_the_worker_stops(
    admin: Admin, queue_name: str, hook: Hook, worker_settings: WorkerSettings
) -> None:
    admin.declare(queue_name)
    admin.publish(queue_name, [b"a", b"b"])
    alerts = {"webhook_url": hook.url, "group_wait": 60.0}  # far beyond the test's length
    async with Worker(failing_app(queue_name), worker_settings(**alerts)) as worker:
        await eventually(lambda: worker.stats.dead_lettered == 2, within=15, what="dead letters")
        await asyncio.sleep(0.3)
        assert hook.posts == []
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 5
    assert len(hook.posts) == 1
    assert hook.posts[0]["groups"][0]["count"] == 2


# -- 4. repeated reconnects -------------------------------------------------------------------


async def test_repeated_reconnects_raise_one_alert(
    admin: Admin, queue_name: str, hook: Hook, worker_settings: WorkerSettings
) -> None:
    admin.declare(queue_name)
    app = App()

    @app.consumer(queue_name)
    def handle(message: Message) -> None:
        pass

    alerts = {"webhook_url": hook.url, "group_wait": 0.3, "reconnect_threshold": 3}
    settings = worker_settings(**alerts)
    named = f'{{"connection_name","{settings.name} (consume)"}}'

    def ours(properties: str) -> bool:
        return named in properties

    async with Worker(app, settings) as worker:
        for round_ in range(3):
            before = worker.connections["consume"]
            closed = await asyncio.to_thread(
                close_main_broker_connections, "client_properties", ours, "test: alerts"
            )
            assert closed == 1

            def reconnected(before: object = before) -> bool:
                return worker.ready and worker.connections["consume"] not in (None, before)

            await eventually(
                reconnected,
                within=15,
                what=f"reconnect {round_ + 1}",
            )
            if round_ < 2:
                await asyncio.sleep(0.5)
                assert hook.posts == [], "alerted below the threshold"
        await eventually(lambda: bool(hook.posts), within=10, what="the reconnect alert")
        await asyncio.sleep(0.6)
    assert len(hook.posts) == 1
    [group] = hook.posts[0]["groups"]
    assert group["kind"] == RECONNECTS
    assert group["connection"] == "consume"
    assert group["count"] == 3
    assert group["queue"] is None
    assert group["error_type"] == "closed_by_broker"
    assert "CONNECTION_FORCED" in group["error"]
    assert "amqp://guest:****@127.0.0.1" in group["error"]
    assert "guest:guest" not in hook.raw[0].decode()
    assert group["first_at"] < group["last_at"]  # first_at: the first reconnect, not the 3rd
    assert worker.stats.reconnects[group["error_type"]] == 3


# -- 5. a stuck handler -----------------------------------------------------------------------


async def test_a_handler_running_past_stuck_after_alerts_once(
    admin: Admin, queue_name: str, hook: Hook, worker_settings: WorkerSettings
) -> None:
    admin.declare(queue_name)
    release = threading.Event()
    app = App()

    @app.consumer(queue_name)
    def handle(message: Message) -> None:
        release.wait(20)

    alerts = {"webhook_url": hook.url, "group_wait": 0.2, "stuck_after": 0.5, "body_chars": 20}
    async with Worker(app, worker_settings(**alerts)) as worker:
        await admin.run(admin.publish, queue_name, [b"slow body " * 10])
        started = time.monotonic()
        await eventually(lambda: bool(hook.posts), within=10, what="the stuck alert")
        took = time.monotonic() - started
        await asyncio.sleep(1.5)  # still running: must not alert again
        assert len(hook.posts) == 1
        release.set()
        await eventually(lambda: worker.stats.acked == 1, within=10, what="the ack")
    assert took >= 0.5
    [group] = hook.posts[0]["groups"]
    assert group["kind"] == STUCK
    assert group["queue"] == queue_name
    assert group["count"] == 1
    assert "has been running for" in group["error"]
    assert group["body_preview"].startswith("slow body")
    assert len(group["body_preview"]) <= 20
    assert len(hook.posts) == 1


@pytest.mark.private_node
@pytest.mark.slow  # waits out broker timeouts or processes: CI's slow pass
async def test_a_channel_closed_by_consumer_timeout_alerts_once(
    private_node: BrokerNode,
    private_admin: Admin,
    queue_name: str,
    hook: Hook,
    make_settings: MakeSettings,
) -> None:
    """Seed 1's failure, staged on the private node (consumer_timeout 5 s) with a worker that
    was not told the broker's value (it would hand the run off before 5 s otherwise): a handler
    outruns it, the broker closes the channel; one alert names the queue and the reason."""
    private_admin.declare(queue_name)
    app = App()
    calls: list[bool] = []

    @app.consumer(queue_name)
    def handle(message: Message) -> None:
        calls.append(message.redelivered)
        if len(calls) == 1:
            time.sleep(7)  # past the node's 5 s consumer_timeout

    settings = make_settings(
        private_node.url,
        consumer_timeout=1800.0,
        name=f"alerts-test-{uuid.uuid4().hex[:8]}",
        alerts=AlertSettings(webhook_url=hook.url, group_wait=0.2, stuck_after=60),
    )
    try:
        async with Worker(app, settings) as worker:
            await private_admin.run(private_admin.publish, queue_name, [b"long job"])
            await eventually(lambda: bool(hook.posts), within=20, what="the alert")
            await eventually(lambda: worker.stats.acked == 1, within=20, what="the redelivery")
    finally:
        private_admin.delete(queue_name, f"{queue_name}.dlq")
    assert calls == [False, True]
    assert len(hook.posts) == 1
    [group] = hook.posts[0]["groups"]
    assert group["kind"] == CONSUMER_TIMEOUT
    assert group["queue"] == queue_name
    assert group["count"] == 1
    assert "PRECONDITION_FAILED" in group["error"] or "timeout" in group["error"].lower()
    assert "consumer_timeout" in hook.posts[0]["text"]


async def test_a_handler_blocking_the_event_loop_alerts_once_naming_it(
    admin: Admin, queue_name: str, hook: Hook, worker_settings: WorkerSettings
) -> None:
    admin.declare(queue_name)
    app = App()

    @app.consumer(queue_name)
    async def blocks_the_loop(message: Message) -> None:
        time.sleep(1.5)  # the mistake the watchdog exists for  # noqa: ASYNC251

    settings = replace(
        # group_wait 1 s: the second stall starts well within it, so both land in one group.
        worker_settings(webhook_url=hook.url, group_wait=1.0, stuck_after=60),
        loop_lag_threshold=0.5,
    )
    async with Worker(app, settings) as worker:
        await admin.run(admin.publish, queue_name, [b"one", b"two"])
        await eventually(lambda: worker.stats.acked == 2, within=20, what="2 acks")
        await eventually(lambda: bool(hook.posts), within=10, what="the alert")
        await asyncio.sleep(0.5)
    assert worker.stats.loop_stalls == 2
    assert len(hook.posts) == 1
    [group] = hook.posts[0]["groups"]
    assert group["kind"] == LOOP_BLOCKED
    assert group["count"] == 2, "both stalls, one group"
    assert "blocks_the_loop" in group["error"]
    assert "1 stall(s) on the event loop" not in hook.posts[0]["text"]
    assert "2 stall(s) on the event loop" in hook.posts[0]["text"]


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made by the machine's openssl."""
    directory.mkdir(exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.mark.parametrize(
    ("scheme", "trusted"), [("smtps", True), ("smtp+starttls", True), ("smtp+starttls", False)]
)
async def test_e_mail_over_tls_verifies_the_server_and_logs_in_encrypted(
    scheme: str,
    trusted: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_settings: MakeSettings,
) -> None:
    cert, key = self_signed_certificate(tmp_path)
    # The client verifies the server as usual, against this certificate instead of the system's
    # (or, untrusted, against another one).
    other, _ = self_signed_certificate(tmp_path / "other") if not trusted else (cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(other))
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    box = Mailbox(port=_free_port())

    def authenticate(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        box.logins.append((data.login.decode(), data.password.decode()))
        return AuthResult(success=box.logins[-1] == (SMTP_USER, SMTP_PASSWORD))

    # smtps is TLS from the first byte; aiosmtpd's auth_require_tls only knows STARTTLS.
    tls: dict[str, Any] = (
        {"ssl_context": server_tls, "server_hostname": "127.0.0.1", "auth_require_tls": False}
        if scheme == "smtps"
        else {"tls_context": server_tls, "require_starttls": True, "auth_require_tls": True}
    )
    controller = Controller(
        _MailHandler(box), hostname="127.0.0.1", port=box.port, authenticator=authenticate, **tls
    )
    controller.start()
    url = f"{scheme}://{SMTP_USER}:{SMTP_PASSWORD}@127.0.0.1:{box.port}"
    alerts = AlertSettings(
        smtp_url=url, email_from="sr@example.test", email_to=("ops@example.test",),
        group_wait=0.1,
    )  # fmt: skip

    try:
        alerter = Alerter(alerts, make_settings())
        alerter.start()
        alerter.dead_lettered("orders", "ValueError", "bad order", b"{}")
        await eventually(lambda: bool(box.mails) or alerter.failed > 0, within=15, what="a send")
        await alerter.aclose()
    finally:
        controller.stop()
    if not trusted:
        assert (alerter.failed, box.mails, box.logins) == (1, [], []), "nothing sent in clear"
        return
    assert alerter.failed == 0
    assert len(box.mails) == 1
    assert box.logins == [(SMTP_USER, SMTP_PASSWORD)]
    assert "bad order" in box.mails[0].get_content()


# -- 6. dead destinations ---------------------------------------------------------------------


async def test_dead_smtp_and_failing_webhook_log_one_line_and_the_worker_carries_on(
    admin: Admin,
    queue_name: str,
    hook: Hook,
    caplog: pytest.LogCaptureFixture,
    worker_settings: WorkerSettings,
) -> None:
    hook.status = 500
    dead_port = _free_port()  # nothing listens there
    admin.declare(queue_name)
    app = App(retry=RetryPolicy(permanent=(ValueError,)))

    @app.consumer(queue_name, concurrency=2)
    def handle(message: Message) -> None:
        if message.body == b"bad":
            raise ValueError("said no")  # (the consumer logs a handler's own error as it is)

    alerts = {
        "smtp_url": f"smtp://{SMTP_USER}:{SMTP_PASSWORD}@127.0.0.1:{dead_port}",
        "email_from": "steadyrabbit@example.test",
        "email_to": "ops@example.test",
        "webhook_url": hook.url,
        "group_wait": 0.2,
    }
    caplog.set_level(logging.WARNING, logger="steadyrabbit")
    async with Worker(app, worker_settings(**alerts)) as worker:
        await admin.run(admin.publish, queue_name, [b"bad", b"ok1", b"ok2"])
        await eventually(
            lambda: sum("alert " in r.getMessage() for r in caplog.records) >= 2,
            within=15,
            what="the failure log lines",
        )
        await admin.run(admin.publish, queue_name, [b"ok3", b"ok4"])
        await eventually(lambda: worker.stats.acked == 5, within=10, what="acks after failures")
        assert worker.stats.dead_lettered == 1
    failures = [r.getMessage() for r in caplog.records if r.getMessage().startswith("alert ")]
    assert len(failures) == 2, failures
    smtp_line = next(line for line in failures if "e-mail" in line)
    hook_line = next(line for line in failures if "webhook" in line)
    assert f"smtp://127.0.0.1:{dead_port}" in smtp_line
    assert "ConnectionRefusedError" in smtp_line
    assert f"http://127.0.0.1:{hook.port} failed" in hook_line
    assert "500" in hook_line
    assert len(hook.posts) == 1  # tried once, not retried in a loop
    for line in failures:
        assert "\n" not in line
    assert_no_secrets(caplog.text)


# -- off by default ---------------------------------------------------------------------------


async def test_without_alert_settings_nothing_runs(
    admin: Admin, queue_name: str, make_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    app = App()

    @app.consumer(queue_name)
    def handle(message: Message) -> None:
        pass

    async with Worker(app, make_settings()) as worker:
        assert not any(t.get_name() == "alerter" for t in asyncio.all_tasks())
        assert all(c.running() == [] for c in worker.consumers)
        assert worker.consumers[0]._processing is None


# -- 7. grouping and muting, on a fake clock --------------------------------------------------


def event(error_type: str = "ValueError", queue: str = "q") -> AlertEvent:
    return AlertEvent(DEAD_LETTERED, error_type, f"{error_type}: boom", queue=queue, body=b"b")


def test_book_waits_group_wait_and_sends_a_burst_once() -> None:
    book = AlertBook(group_wait=30, repeat_interval=900)
    for t in (0.0, 1.0, 5.0):
        book.add(event(), now=t, wall=1000 + t)
    book.add(event("KeyError"), now=20.0, wall=1020)  # a second group joins the same batch
    assert book.next_due() == 30.0
    assert book.take_due(29.9) == []
    reports = book.take_due(30.0)
    assert [(r.event.error_type, r.count) for r in reports] == [("ValueError", 3), ("KeyError", 1)]
    assert reports[0].first_at == 1000.0
    assert reports[0].last_at == 1005.0
    assert book.take_due(31.0) == []
    assert book.next_due() == float("inf")


def test_book_holds_a_muted_group_and_follows_up_at_the_end_of_the_mute() -> None:
    book = AlertBook(group_wait=10, repeat_interval=100)
    book.add(event(), now=0, wall=0)
    assert len(book.take_due(10)) == 1  # muted until 110
    for t in (20.0, 50.0, 80.0):
        book.add(event(), now=t, wall=t)
    assert book.next_due() == 110
    assert book.take_due(109) == []
    [follow_up] = book.take_due(110)
    assert (follow_up.count, follow_up.follow_up) == (3, True)
    # Silent through the next mute: forgotten, so the next event is new and waits group_wait.
    assert book.take_due(210) == []
    book.add(event(), now=300, wall=300)
    assert book.next_due() == 310
    [fresh] = book.take_due(310)
    assert (fresh.count, fresh.follow_up) == (1, False)
    # The same without a look at the book between the end of the mute (410) and the event.
    book.add(event(), now=500, wall=500)
    assert book.next_due() == 510
    [fresh] = book.take_due(510)
    assert (fresh.count, fresh.follow_up) == (1, False)


def test_book_keeps_a_new_group_waiting_while_a_follow_up_goes_out() -> None:
    book = AlertBook(group_wait=10, repeat_interval=100)
    book.add(event(), now=0, wall=0)
    book.take_due(10)
    book.add(event(), now=50, wall=50)  # held until 110
    book.add(event("KeyError"), now=105, wall=105)  # new: due at 115
    assert [r.event.error_type for r in book.take_due(110)] == ["ValueError"]
    assert book.next_due() == 115
    assert [r.event.error_type for r in book.take_due(115)] == ["KeyError"]


def test_book_sends_everything_pending_when_stopping() -> None:
    book = AlertBook(group_wait=10, repeat_interval=100)
    book.add(event(), now=0, wall=0)
    book.take_due(10)
    book.add(event(), now=20, wall=20)  # muted
    book.add(event("KeyError"), now=21, wall=21)  # still in group_wait
    assert sorted((r.event.error_type, r.count) for r in book.take_all(22)) == [
        ("KeyError", 1),
        ("ValueError", 1),
    ]


def test_reconnect_counter_counts_within_the_window() -> None:
    counter = ReconnectCounter(window=60)
    assert [counter.add(t) for t in (0, 10, 20)] == [1, 2, 3]
    assert counter.add(65) == 3  # 0 fell out of the window
    assert counter.add(75) == 3  # and 10
    assert counter.add(200) == 1


def test_webhook_secrets_are_scrubbed_also_when_quoted_alone() -> None:
    """An error may quote a query value decoded and apart from the URL."""
    alerts = AlertSettings(
        webhook_url=f"https://hooks.example/in?token={HOOK_TOKEN}%2Fx&sig=s1gn-ature",
    )
    text = f"refused: {HOOK_TOKEN}/x (sig s1gn-ature) for https://hooks.example/in?sig=s1gn-ature"
    scrubbed = scrub(text, _secrets_of(alerts))
    assert HOOK_TOKEN not in scrubbed
    assert "s1gn-ature" not in scrubbed
    assert scrubbed == "refused: **** (sig ****) for https://hooks.example/in?sig=****"


def test_alert_settings_validation() -> None:
    def refused(**values: Any) -> str:
        with pytest.raises(ConfigurationError) as info:
            AlertSettings(**values)
        message = str(info.value)
        assert "\n" not in message
        return message

    assert "need a destination" in refused()
    assert "all of smtp_url, email_from and email_to" in refused(smtp_url="smtp://mail")
    message = refused(smtp_url=f"smtp://u:{SMTP_PASSWORD}@mail:notaport", email_from="a@b",
                      email_to="c@d")
    assert "port must be a number" in message
    assert SMTP_PASSWORD not in message
    assert "scheme must be" in refused(smtp_url="imap://mail", email_from="a@b", email_to="c@d")
    message = refused(webhook_url=f"ftp://x:{HOOK_PASSWORD}@h/{HOOK_PATH_SECRET}?t={HOOK_TOKEN}")
    assert "scheme must be http:// or https://" in message
    assert_no_secrets(message)
    assert "not an e-mail address" in refused(
        smtp_url="smtp://mail", email_from="a@b", email_to="c@d\nBcc: x@y"
    )
    assert "group_wait" in refused(webhook_url="http://h", group_wait=-1)
    assert "repeat_interval" in refused(webhook_url="http://h", repeat_interval=0)
    assert "reconnect_threshold" in refused(webhook_url="http://h", reconnect_threshold=0)
    assert "stuck_after" in refused(webhook_url="http://h", stuck_after=0)
    assert "body_chars" in refused(webhook_url="http://h", body_chars=3)

    ok = AlertSettings(smtp_url="smtps://mail.example", email_from="a@b", email_to=("c@d",))
    assert ok.email_to == ("c@d",)
    assert ok.smtp is not None
    assert ok.smtp.port == 465
    server = parse_smtp_url(f"smtp+starttls://bot:{SMTP_PASSWORD}@mail.example")
    assert (server.port, server.username, server.password) == (587, "bot", SMTP_PASSWORD)
    assert SMTP_PASSWORD not in f"{server} {server!r}"
    shown = repr(
        AlertSettings(
            smtp_url=f"smtp://bot:{SMTP_PASSWORD}@mail.example",
            email_from="a@b",
            email_to=("c@d",),
            webhook_url=f"https://u:{HOOK_PASSWORD}@h.example/{HOOK_PATH_SECRET}?t={HOOK_TOKEN}",
        )
    )
    assert "mail.example" in shown
    assert "h.example" in shown
    assert_no_secrets(shown)


# -- from the command line ----------------------------------------------------------------------


def test_the_relay_alerts_as_configured_by_file_and_environment(
    mailbox: Mailbox, hook: Hook, queue_name: str, admin: Admin, tmp_path: Path
) -> None:
    """`steadyrabbit relay` with the e-mail settings in a TOML file and the webhook in the
    environment: three rejected messages give one e-mail and one POST, nothing else."""
    admin.declare(queue_name)
    config = tmp_path / "steadyrabbit.toml"
    config.write_text(
        f'alert_smtp_url = "{mailbox.url}"\n'
        'alert_email_from = "steadyrabbit@example.test"\n'
        'alert_email_to = ["ops@example.test"]\n'
        "alert_group_wait = 0.5\n"
        "max_attempts = 1\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEADYRABBIT_")}
    env["STEADYRABBIT_ALERT_WEBHOOK_URL"] = hook.url
    log = tmp_path / "relay.log"
    # Port 9 (discard) refuses: with max_attempts 1 each message is dead-lettered at once.
    with log.open("wb") as out:
        relay = subprocess.Popen(
            [
                sys.executable, "-m", "steadyrabbit", "relay", queue_name, "http://127.0.0.1:9/",
                "--url", MAIN_URL, "--config", str(config),
            ],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        admin.publish(queue_name, [b"first", b"second", b"third"])
        deadline = time.monotonic() + 30
        while not (mailbox.mails and hook.posts) and time.monotonic() < deadline:
            assert relay.poll() is None, log.read_text()
            time.sleep(0.1)
        time.sleep(1.0)  # a second notification, were there one, would come within group_wait
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(20) == 0, log.read_text()
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait(10)
    assert len(mailbox.mails) == 1, log.read_text()
    assert len(hook.posts) == 1, hook.posts
    [group] = hook.posts[0]["groups"]
    assert group["queue"] == queue_name
    assert group["count"] == 3
    assert admin.counts(f"{queue_name}.dlq")[0] == 3
    output = log.read_text() + json.dumps(hook.posts) + mailbox.mails[0].as_string()
    assert not [secret for secret in SECRETS if secret in output]
