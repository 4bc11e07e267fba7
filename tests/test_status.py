"""The live status of a worker: ``/status.json`` and the status page (``/``), on a real broker.

The page is run in Debian's headless Chromium (``--dump-dom``): the numbers and the chart in
the DOM it prints were filled in by the page's own script from ``/status.json``. Chromium is
required; ``STEADYRABBIT_SKIP_BROWSER=1`` skips those tests, with that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from typing import Any

import pika
import pytest

from steadyrabbit import App, Message, Reject, Retry, Worker
from steadyrabbit._status import status_page
from tests.conftest import Admin, MakeSettings, eventually
from tests.test_metrics import get

pytestmark = pytest.mark.anyio

MASKED = "amqp://guest:****@127.0.0.1:5672/%2F"
# The local broker's password is "guest": this must never be served.
UNMASKED = "guest:guest@"


async def status(worker: Worker) -> dict[str, Any]:
    response = await get(worker, "/status.json")
    assert response.status == 200, response
    assert response.content_type == "application/json"
    assert UNMASKED not in response.body
    document = json.loads(response.body)
    assert isinstance(document, dict)
    return document


async def test_status_json_follows_real_traffic(
    queue_name: str, admin: Admin, metrics_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    admin.publish(queue_name, [b"ok"] * 5 + [b"reject", b"retry"])
    app = App()

    @app.consumer(queue_name, concurrency=3)
    async def handle(message: Message) -> None:
        if message.body == b"reject":
            raise Reject("no good")
        if message.body == b"retry":
            raise Retry("later", delay=60)

    async with Worker(app, metrics_settings(consumer_timeout=900, name="status-test")) as worker:
        before = await status(worker)
        await eventually(lambda: worker.stats.acked == 7, what="7 acks")
        after = await status(worker)
    assert after["kind"] == "steadyrabbit.status"
    assert after["format"] == 1
    assert after["worker"]["name"] == "status-test"
    assert after["worker"]["pid"] == os.getpid()
    assert after["worker"]["host"]
    assert after["worker"]["uptime_seconds"] >= before["worker"]["uptime_seconds"] > 0
    assert after["ready"] is True
    assert after["not_ready_reason"] is None
    assert after["consumer_timeout_seconds"] == 900
    assert after["heartbeat_seconds"] == 15
    assert after["broker"] == MASKED
    assert after["connections"]["consume"] == {
        "connected": True,
        "broker": MASKED,
        "traffic_age_seconds": after["broker_traffic_age_seconds"],
    }
    assert 0 <= after["broker_traffic_age_seconds"] < 60
    assert after["loop_lag_seconds"] < 1.0  # a turning loop: below the stall threshold
    totals = after["totals"]
    assert (totals["delivered"], totals["acked"], totals["succeeded"]) == (7, 7, 5)
    assert (totals["retried"], totals["dead_lettered"]) == (1, 1)
    assert (totals["in_flight"], totals["waiting"], totals["stale_acks_dropped"]) == (0, 0, 0)
    assert after["reconnects"] == {
        "closed_by_broker": 0,
        "connect_failed": 0,
        "connection_lost": 0,
        "missed_heartbeats": 0,
    }
    [consumer] = after["consumers"]
    assert consumer["queue"] == queue_name
    assert consumer["ready"] is True
    # No prefetch of its own: the window follows the handlers (fast here: it grew).
    assert consumer["concurrency"] == 3
    assert consumer["prefetch"] > 3
    assert consumer["prefetch_reason"].startswith("handlers take about")
    assert consumer["handled"] == 7, "every handler call, the failing ones too"
    assert (consumer["delivered"], consumer["acked"], consumer["succeeded"]) == (7, 7, 5)
    assert (consumer["retried"], consumer["dead_lettered"]) == (1, 1)
    assert consumer["in_flight_ages_seconds"] == []
    assert consumer["oldest_unacked_age_seconds"] == 0


async def test_each_consumer_has_its_own_counts(
    queue_name: str, admin: Admin, metrics_settings: MakeSettings
) -> None:
    other = f"{queue_name}-other"
    admin.declare(queue_name)
    admin.declare(other)
    admin.publish(queue_name, [b"ok"] * 3)
    admin.publish(other, [b"ok", b"reject"])
    app = App()

    @app.consumer(queue_name)
    async def first(message: Message) -> None:
        pass

    @app.consumer(other)
    async def second(message: Message) -> None:
        if message.body == b"reject":
            raise Reject("no good")

    try:
        async with Worker(app, metrics_settings()) as worker:
            await eventually(lambda: worker.stats.acked == 5, what="5 acks")
            document = await status(worker)
    finally:
        admin.delete(other, f"{other}.dlq")
    counts = {
        c["queue"]: (c["delivered"], c["succeeded"], c["retried"], c["dead_lettered"])
        for c in document["consumers"]
    }
    assert counts == {queue_name: (3, 3, 0, 0), other: (2, 1, 0, 1)}
    totals = document["totals"]
    assert (totals["delivered"], totals["acked"], totals["dead_lettered"]) == (5, 5, 1)


async def test_duplicates_suppressed_and_leases_held(
    queue_name: str, admin: Admin, metrics_settings: MakeSettings
) -> None:
    """The same order sent twice: the first run holds a lease while it runs; the copy is acked
    without running and counted as a duplicate, in the totals and in its consumer."""
    admin.declare(queue_name)
    order = pika.BasicProperties(delivery_mode=2, message_id="order-1")
    release = asyncio.Event()
    app = App()

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        await release.wait()

    async with Worker(app, metrics_settings()) as worker:
        await admin.run(admin.publish, queue_name, [b"order"], properties=order)
        await eventually(lambda: worker.in_flight == 1, what="the first run")
        during = await status(worker)
        release.set()
        await eventually(lambda: worker.stats.acked == 1, what="the first ack")
        await admin.run(admin.publish, queue_name, [b"order"], properties=order)
        await eventually(lambda: worker.stats.acked == 2, what="the copy acked")
        after = await status(worker)
    assert during["totals"]["leases_held"] == 1
    assert during["totals"]["duplicates"] == 0
    totals = after["totals"]
    assert (totals["duplicates"], totals["succeeded"], totals["leases_held"]) == (1, 1, 0)
    assert (totals["handed_off"], totals["markers"]) == (0, 0)
    [consumer] = after["consumers"]
    assert (consumer["duplicates"], consumer["handed_off"], consumer["markers"]) == (1, 0, 0)
    assert consumer["handled"] == 1, "the copy never reached the handler"


async def test_in_flight_ages_of_slow_handlers_oldest_first(
    queue_name: str, admin: Admin, metrics_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    app = App()
    release = asyncio.Event()

    @app.consumer(queue_name, concurrency=3)
    async def handle(message: Message) -> None:
        await release.wait()

    async with Worker(app, metrics_settings(consumer_timeout=60)) as worker:
        [consumer] = worker.consumers
        await admin.run(admin.publish, queue_name, [b"first"])
        await eventually(lambda: consumer.in_flight == 1)
        await asyncio.sleep(0.4)
        await admin.run(admin.publish, queue_name, [b"second"])
        await eventually(lambda: consumer.in_flight == 2)
        during = await status(worker)
        release.set()
        await eventually(lambda: worker.stats.acked == 2, what="2 acks")
        after = await status(worker)
    [consumer] = during["consumers"]
    assert consumer["in_flight"] == 2
    assert during["totals"]["in_flight"] == 2
    older, newer = consumer["in_flight_ages_seconds"]
    assert older >= newer + 0.3, "oldest first"
    assert 0.4 <= older < 30
    assert consumer["oldest_unacked_age_seconds"] >= older
    assert consumer["in_flight_ages_omitted"] == 0
    assert after["consumers"][0]["in_flight_ages_seconds"] == []


async def test_the_page_and_its_headers(
    queue_name: str, admin: Admin, metrics_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    app = App()

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        pass

    async with Worker(app, metrics_settings()) as worker:
        address = worker.metrics_address
        assert address is not None
        for path in ("/", "/status", "/?refresh=1"):
            page = await get(worker, path)
            assert page.status == 200, path
            assert page.content_type == "text/html; charset=utf-8"
            assert '<svg id="chart"' in page.body
        # Self-contained: nothing is loaded from anywhere (the machine may be offline).
        assert not re.search(r"https?://|\bsrc=|\bhref=|@import", page.body)
        assert UNMASKED not in page.body
        missing = await get(worker, "/nope")
        assert missing.status == 404
        assert "/status.json" in missing.body
        head = await get(worker, "/status.json", "HEAD")
        assert (head.status, head.body) == (200, "")


async def test_the_page_has_a_strict_content_security_policy(
    queue_name: str, admin: Admin, metrics_settings: MakeSettings
) -> None:
    import http.client

    admin.declare(queue_name)
    app = App()

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        pass

    def headers(address: tuple[str, int]) -> dict[str, str]:
        connection = http.client.HTTPConnection(*address, timeout=10)
        try:
            connection.request("GET", "/")
            response = connection.getresponse()
            response.read()
            return {name.lower(): value for name, value in response.getheaders()}
        finally:
            connection.close()

    async with Worker(app, metrics_settings()) as worker:
        address = worker.metrics_address
        assert address is not None
        found = await asyncio.to_thread(headers, address)
    policy = found["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "connect-src 'self'" in policy
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+'", policy)
    assert "unsafe" not in policy
    assert found["x-content-type-options"] == "nosniff"


# -- in Chromium ------------------------------------------------------------------------------


def chromium() -> str:
    if os.environ.get("STEADYRABBIT_SKIP_BROWSER") == "1":
        pytest.skip("STEADYRABBIT_SKIP_BROWSER=1: the status page is not run in Chromium")
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail(
            "chromium is not installed, and the status page's tests need it: "
            "sudo apt-get install -y chromium (scripts/bootstrap.sh does it when run as root), "
            "or set STEADYRABBIT_SKIP_BROWSER=1 to skip these tests"
        )
    return found


async def dump_dom(browser: str, url: str, *, budget_ms: int = 5000) -> str:
    """The DOM of ``url`` after ``budget_ms`` of (virtual) time in headless Chromium."""
    with tempfile.TemporaryDirectory(prefix="steadyrabbit-chromium-") as profile:
        process = await asyncio.create_subprocess_exec(
            browser,
            "--headless",
            "--no-sandbox",  # as root (CI containers) Chromium refuses to start otherwise
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            "--dump-dom",
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its helper processes go with it on a timeout
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), 45)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            raise AssertionError("chromium did not finish within 45 s") from None
        assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode(errors="replace")


async def test_the_page_in_chromium_shows_real_numbers_and_draws_the_chart(
    queue_name: str, admin: Admin, metrics_settings: MakeSettings
) -> None:
    browser = chromium()
    admin.declare(queue_name)
    app = App()
    release = asyncio.Event()

    @app.consumer(queue_name, concurrency=4)
    async def handle(message: Message) -> None:
        if message.body == b"slow":
            await release.wait()
        elif message.body == b"reject":
            raise Reject("no good")

    def feed(stop: threading.Event) -> None:
        # Steady traffic all along (one message every few ms), so that successive polls, which
        # come quickly in Chromium's virtual time, see the counters move.
        with pika.BlockingConnection(pika.URLParameters(admin.url)) as connection:
            channel = connection.channel()
            while not stop.wait(0.003):
                channel.basic_publish("", queue_name, b"ok")

    # A run still going at 60 % of consumer_timeout is handed off, and then no longer counts
    # against it (no bar): the slow handler stays well below that here. The bars' colours are
    # checked on a status document of known ages (the next test).
    async with Worker(app, metrics_settings(consumer_timeout=20)) as worker:
        [consumer] = worker.consumers
        address = worker.metrics_address
        assert address is not None
        await admin.run(admin.publish, queue_name, [b"slow", b"reject"])
        await eventually(lambda: worker.stats.dead_lettered == 1, what="the dead letter")
        stop = threading.Event()
        feeding = asyncio.ensure_future(asyncio.to_thread(feed, stop))
        try:
            await eventually(lambda: worker.stats.acked >= 10, what="traffic")
            dom = await dump_dom(browser, f"http://{address[0]}:{address[1]}/", budget_ms=20000)
        finally:
            stop.set()
            await feeding
        acked_at_end = worker.stats.acked
        release.set()
        await eventually(lambda: consumer.in_flight == 0, what="the slow handler")
    polls = re.search(r'<body data-polls="(\d+)"', dom)
    assert polls is not None, dom[:3000]
    assert int(polls.group(1)) >= 3
    assert '<span id="state" class="ready">ready</span>' in dom
    assert f'<span id="broker">{MASKED}</span>' in dom
    assert UNMASKED not in dom
    succeeded = int(_text(dom, "succeeded"))
    assert 10 <= succeeded < acked_at_end, "all but the dead-lettered one"
    assert int(_text(dom, "delivered")) > succeeded
    assert _text(dom, "dead_lettered") == "1"
    # The slow handler, and maybe a quick one caught running.
    assert 1 <= int(_text(dom, "in_flight")) <= 4
    assert re.fullmatch(r"\d+\.\d", _text(dom, "rate"))
    queue = re.escape(queue_name)
    row = re.search(rf'<tr data-queue="{queue}"><td>[^<]*</td><td>[1-4] / 4</td>', dom)
    assert row is not None, "the queue's row, with its running handler"
    # The chart: a line through one point per poll after the first.
    points = re.search(r'<polyline id="chart-line" points="([^"]*)"', dom)
    assert points is not None
    coordinates = [p.split(",") for p in points.group(1).split()]
    assert len(coordinates) >= 2
    assert all(0 <= float(x) <= 600 and 0 <= float(y) <= 160 for x, y in coordinates)
    assert any(float(y) < 150 for _, y in coordinates), "some throughput above zero"
    assert re.search(r'class="age-bar" style="width: [\d.]+%;"', dom), "the slow handler's bar"
    assert _text(dom, "duplicates") == "0"
    assert _text(dom, "long_runs") == "handed off 0, markers 0, leases held 0"


async def test_the_page_in_chromium_colours_the_bars_and_shows_the_long_runs() -> None:
    """The page on a status document of known ages and counters, served by a stub: a run past
    half of consumer_timeout is amber, past 90 % red; duplicates and hand-offs are shown."""
    browser = chromium()
    page, _policy = status_page()
    document = {
        "format": 1,
        "kind": "steadyrabbit.status",
        "worker": {"name": "stub", "pid": 1, "host": "box", "uptime_seconds": 60.0},
        "ready": True,
        "not_ready_reason": None,
        "consumer_timeout_seconds": 100,
        "heartbeat_seconds": 15,
        "broker": MASKED,
        "broker_traffic_age_seconds": 0.1,
        "loop_lag_seconds": 0.001,
        "loop_lag_max_seconds": 0.002,
        "totals": {
            "delivered": 20, "succeeded": 12, "retried": 1, "dead_lettered": 1,
            "in_flight": 3, "stale_acks_dropped": 0, "handler_errors": 0, "duplicates": 3,
            "handed_off": 2, "markers": 5, "leases_held": 1,
        },
        "reconnects": {"connection_lost": 0},
        "consumers": [
            {
                "queue": "orders", "in_flight": 3, "concurrency": 4, "waiting": 0,
                "handled": 12, "oldest_unacked_age_seconds": 95.0,
                "in_flight_ages_seconds": [95.0, 55.0, 10.0], "in_flight_ages_omitted": 0,
            }
        ],
    }  # fmt: skip
    body = json.dumps(document).encode()

    class Stub(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            found = {"/": (page, "text/html"), "/status.json": (body, "application/json")}
            content, kind = found.get(self.path.partition("?")[0], (b"", "text/plain"))
            self.send_response(200 if content else 404)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        dom = await dump_dom(browser, f"http://127.0.0.1:{server.server_port}/", budget_ms=3000)
    finally:
        server.shutdown()
        server.server_close()
    bars = re.findall(r'class="(age-bar[^"]*)" style="width: ([\d.]+)%;"', dom)
    shown = [(kind, float(width)) for kind, width in bars]
    assert shown == [("age-bar bad", 95.0), ("age-bar warn", 55.0), ("age-bar", 10.0)], dom
    assert _text(dom, "duplicates") == "3"
    assert _text(dom, "long_runs") == "handed off 2, markers 5, leases held 1"


def _text(dom: str, element_id: str) -> str:
    found = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert found is not None, f"no #{element_id}"
    return found.group(1)
