"""A password never leaves the process: one broker user with a distinctive password runs the
relay (debug logs, JSON logs, a reconnect, a dead letter), the metrics endpoint, the status page,
doctor and the dlq commands, and a failed login; every byte they print or serve is searched for
the password, raw and URL-encoded."""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests._broker import close_main_broker_connections, main_broker_ctl
from tests.conftest import Admin

ROOT = Path(__file__).resolve().parent.parent
# Characters that URL encoding changes, so that both spellings are looked for.
PASSWORD = "Pw/7x@k:q#1-steady"
ENCODED = quote(PASSWORD, safe="")
SERVED = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")


@pytest.fixture(scope="module")
def user() -> Iterator[str]:
    name = f"sr-secrets-{uuid.uuid4().hex[:6]}"
    main_broker_ctl("add_user", name, PASSWORD)
    try:
        main_broker_ctl("set_permissions", "-p", "/", name, ".*", ".*", ".*")
        yield name
    finally:
        main_broker_ctl("delete_user", name)


class Target(http.server.BaseHTTPRequestHandler):
    """Accepts a body, except "bad" (400: dead-lettered at once)."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(400 if body == b"bad" else 200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def target() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Target)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        thread.join(5)
        server.server_close()


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("STEADYRABBIT_")}


def cli(*args: str, timeout: float = 60) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "steadyrabbit", *args],
        cwd=ROOT,
        env=env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done.stdout + done.stderr


def wait_for(condition: object, what: str, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def run_relay(
    url: str, user: str, queue: str, target: str, log: Path, admin: Admin, *extra: str
) -> list[str]:
    """Run the relay until one message is handled and one dead-lettered, across a reconnect;
    return everything its endpoint served."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "steadyrabbit", "relay", queue, target, "--url", url,
                "--metrics-port", "0", "--max-attempts", "1", *extra,
            ],
            cwd=ROOT, env=env(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    served: list[str] = []
    try:
        ports: list[int] = []

        def logged() -> bool:
            assert proc.poll() is None, log.read_text()
            match = SERVED.search(log.read_text(errors="replace"))
            if match:
                ports.append(int(match.group(1)))
            return bool(ports)

        wait_for(logged, "the metrics address in the log")
        base = f"http://127.0.0.1:{ports[0]}"

        def ready() -> bool:
            return httpx.get(f"{base}/readyz", timeout=5).status_code == 200

        wait_for(ready, "the relay to be ready")
        admin.publish(queue, [b"good", b"bad"])
        wait_for(lambda: admin.counts(f"{queue}.dlq")[0] == 1, "the dead letter")
        closed = close_main_broker_connections(
            "user", user.__eq__, "secrets test: force a reconnect"
        )
        assert closed == 2, "the relay's consume and publish connections"

        def reconnected() -> bool:
            metrics = httpx.get(f"{base}/metrics", timeout=5).text
            counts = re.findall(r"^steadyrabbit_reconnects_total\{[^}]*\} (\S+)$", metrics, re.M)
            return ready() and sum(float(count) for count in counts) >= 1

        wait_for(reconnected, "the relay to reconnect")
        for path in ("/metrics", "/readyz", "/healthz", "/status.json", "/"):
            response = httpx.get(base + path, timeout=5)
            served.append(f"{path} {response.status_code}\n{response.text}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return served


@pytest.mark.slow  # waits out broker timeouts or processes: CI's slow pass
def test_no_output_anywhere_shows_the_password(
    user: str, queue_name: str, target: str, tmp_path: Path, admin: Admin
) -> None:
    url = f"amqp://{user}:{ENCODED}@127.0.0.1:5672/%2F"
    admin.declare(queue_name)
    outputs: dict[str, str] = {}
    plain_log, json_log = tmp_path / "plain.log", tmp_path / "json.log"
    served = run_relay(url, user, queue_name, target, plain_log, admin, "--log-level", "debug")
    outputs.update({f"endpoint {text.split()[0]}": text for text in served})
    outputs["relay log (plain, debug)"] = plain_log.read_text(errors="replace")
    with contextlib.suppress(Exception):
        admin.drain(f"{queue_name}.dlq")
    run_relay(url, user, queue_name, target, json_log, admin, "--log-format", "json")
    outputs["relay log (json)"] = json_log.read_text(errors="replace")
    outputs["doctor"] = cli("doctor", queue_name, "--url", url)
    outputs["doctor --json"] = cli("doctor", queue_name, "--url", url, "--json")
    outputs["dlq list"] = cli("dlq", "list", queue_name, "--url", url)
    outputs["dlq list --json"] = cli("dlq", "list", queue_name, "--url", url, "--json")
    wrong = f"amqp://{user}:{ENCODED}x@127.0.0.1:5672/%2F"
    outputs["login refused"] = cli("relay", queue_name, target, "--url", wrong)
    outputs["doctor, login refused"] = cli("doctor", "--url", wrong, "--log-level", "debug")
    bad = f"amqp://{user}:{ENCODED}@127.0.0.1:5672/%2F?heartbeat=often"
    outputs["bad url"] = cli("relay", queue_name, target, "--url", bad)

    # Each output really is what it claims to be, so that an empty one cannot pass.
    assert "steadyrabbit_messages_delivered_total" in outputs["endpoint /metrics"]
    assert queue_name in outputs["endpoint /status.json"]
    assert "dead-lettered" in outputs["relay log (plain, debug)"]
    assert '"level": "info"' in outputs["relay log (json)"]
    assert queue_name in outputs["doctor"]
    assert "1 message" in outputs["dlq list"]
    assert "ACCESS_REFUSED" in outputs["login refused"] or "refused" in outputs["login refused"]
    assert "heartbeat" in outputs["bad url"]
    assert f"{user}:****@" in outputs["doctor"]

    leaks = [
        name for name, text in outputs.items() if PASSWORD in text or ENCODED in text
    ]
    assert not leaks, {name: outputs[name][:2000] for name in leaks}
