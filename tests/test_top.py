"""``steadyrabbit top``: rendering (pure), the URL forms, and the live view of a real worker."""

from __future__ import annotations

import asyncio
import io
import os
import re
import socket
import subprocess
import sys
from typing import Any

import pytest

from steadyrabbit import App, ConfigurationError, Message, Worker
from steadyrabbit._errors import StatusUnavailableError
from steadyrabbit._ops.top import fetch_status, render, status_url, watch
from tests.conftest import Admin, MakeSettings, eventually

pytestmark = pytest.mark.anyio

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def document(
    *,
    acked: int = 0,
    uptime: float = 10.0,
    pid: int = 4242,
    handled: int | None = None,
    ages: tuple[float, ...] = (),
    timeout: float = 20.0,
    ready: bool = True,
    reconnects: dict[str, int] | None = None,
    queue: str = "orders",
) -> dict[str, Any]:
    """A status document as the worker serves it (only the fields that matter here)."""
    return {
        "format": 1,
        "kind": "steadyrabbit.status",
        "worker": {"name": "billing", "pid": pid, "host": "box", "uptime_seconds": uptime},
        "ready": ready,
        "not_ready_reason": None if ready else "not connected to the broker (connecting)",
        "consumer_timeout_seconds": timeout,
        "heartbeat_seconds": 15,
        "broker": "amqp://guest:****@127.0.0.1:5672/%2F",
        "broker_traffic_age_seconds": 0.2,
        "loop_lag_seconds": 0.001,
        "loop_lag_max_seconds": 0.004,
        "totals": {
            "delivered": acked + len(ages),
            "succeeded": acked - 3,
            "acked": acked,
            "retried": 2,
            "dead_lettered": 1,
            "handler_errors": 1,
            "stale_acks_dropped": 0,
            "channel_recoveries": 0,
            "requeued_unstarted": 0,
            "requeued_aged": 0,
            "in_flight": len(ages),
        },
        "reconnects": reconnects or {"connection_lost": 0, "missed_heartbeats": 0},
        "consumers": [
            {
                "queue": queue,
                "ready": True,
                "concurrency": 4,
                "prefetch": 4,
                "in_flight": len(ages),
                "waiting": 0,
                "handled": acked if handled is None else handled,
                "oldest_unacked_age_seconds": max(ages, default=0.0),
                "in_flight_ages_seconds": sorted(ages, reverse=True),
                "in_flight_ages_omitted": 0,
            }
        ],
    }


# -- render: pure ---------------------------------------------------------------------------------


def test_throughput_comes_from_counter_deltas() -> None:
    previous = document(acked=100, uptime=10.0)
    current = document(acked=150, uptime=12.0)
    screen = render(previous, current, 2.0, 120)
    assert "throughput  25.0 msg/s succeeded" in screen
    assert "(last 2.0s)" in screen
    assert "dead-lettered 0.0/s" in screen  # unchanged counters: no rate
    [row] = [line for line in screen.splitlines() if line.startswith("orders")]
    # RUNNING, WAITING, WINDOW (the prefetch in force), HANDLED, MSG/S
    assert row.split()[1:6] == ["0/4", "0", "4", "150", "25.0"]
    assert "READY" in screen
    assert "totals      delivered 150  succeeded 147  retried 2  dead-lettered 1" in screen


def test_without_a_previous_sample_or_after_a_restart_rates_are_averages_since_start() -> None:
    current = document(acked=50, uptime=10.0)
    assert "throughput  4.7 msg/s succeeded" in render(None, current, 0.0, 120)
    assert "avg since start" in render(None, current, 0.0, 120)
    restarted = document(acked=500, uptime=100.0, pid=1)
    screen = render(restarted, current, 1.0, 120)
    assert "throughput  4.7 msg/s succeeded" in screen, "counters reset: no negative rate"
    assert "avg since start" in screen


def test_in_flight_ages_are_bars_against_consumer_timeout_oldest_first() -> None:
    screen = render(None, document(ages=(5.0, 15.0), timeout=20.0), 0.0, 74)
    bars = [line for line in screen.splitlines() if "[" in line and "of 20.0s" in line]
    assert len(bars) == 2
    old, young = bars
    assert "15.0s" in old
    assert " 75% of 20.0s !" in old, "past half: flagged"
    assert "5.0s" in young
    assert " 25% of 20.0s" in young
    assert not young.endswith("!")
    fill = re.search(r"\[(#*)(\.*)\]", old)
    assert fill is not None
    assert len(fill.group(1)) == round(0.75 * (len(fill.group(1)) + len(fill.group(2))))
    assert "15.0s" in next(line for line in screen.splitlines() if line.startswith("orders"))


def test_no_line_is_wider_than_the_screen() -> None:
    long_queue = "PURCHASING_CONTRACT_CONSUMER_WITH_A_VERY_LONG_NAME_INDEED"
    current = document(acked=9, ages=(1.0, 30.0, 1900.0), timeout=1800, queue=long_queue)
    for width in (20, 40, 60, 80, 200):
        screen = render(document(acked=3, uptime=9.0), current, 1.0, width)
        assert all(len(line) <= width for line in screen.splitlines()), width
    tiny = render(None, current, 0.0, 5)
    assert all(len(line) <= 20 for line in tiny.splitlines()), "at least 20 columns"
    assert "PURCHASING_CONTRACT_CON~" in render(None, current, 0.0, 78)


@pytest.mark.parametrize("color", [False, True])
def test_a_frame_fits_80_columns_without_losing_a_field(color: bool) -> None:
    """A busy worker on a long broker URL, at 80 columns: fields that do not fit go to the next
    line; none is cut off, the dead-letter rate and consumer_timeout included."""
    current = document(
        acked=123456, uptime=3600.0, ages=(5.0, 1500.0), timeout=1800,
        reconnects={"connection_lost": 12, "missed_heartbeats": 3},
    )  # fmt: skip
    current["broker"] = "amqp://worker:****@rabbit-1.prod.example.com:5672/prod"
    current["totals"].update(stale_acks_dropped=7, requeued_unstarted=11, requeued_aged=2)
    previous = document(acked=100000, uptime=3598.0)
    previous["totals"]["dead_lettered"] = 0
    screen = render(previous, current, 2.0, 80, color=color)
    plain = ANSI.sub("", screen)
    assert all(len(line) <= 80 for line in plain.splitlines()), plain
    assert "~" not in plain, "nothing cut"
    for field in (
        "consumer_timeout 30m00s", "heartbeat 15s", "loop lag 1.0ms (max 4.0ms)",
        "broker traffic 0.2s ago", "broker amqp://worker:****@rabbit-1.prod.example.com:5672/prod",
        "throughput  11728.0 msg/s succeeded (last 2.0s)", "delivered 11729.0/s",
        "retried 0.0/s", "dead-lettered 0.5/s", "dead-lettered 1", "errors 1", "stale acks 7",
        "reconnects  15 (connection_lost 12, missed_heartbeats 3)", "channel recoveries 0",
        "requeued: unstarted 11, aged 2", "83% of 30m00s !",
    ):  # fmt: skip
        assert field in plain, (field, plain)


def test_reconnects_not_ready_and_colour() -> None:
    current = document(ready=False, reconnects={"connection_lost": 2, "missed_heartbeats": 1})
    plain = render(None, current, 0.0, 120)
    assert "NOT READY: not connected to the broker (connecting)" in plain
    assert "reconnects  3 (connection_lost 2, missed_heartbeats 1)" in plain
    assert not ANSI.search(plain)
    coloured = render(None, current, 0.0, 120, color=True)
    assert "\x1b[31mNOT READY" in coloured
    assert ANSI.sub("", coloured) == plain


def test_many_handlers_are_listed_up_to_a_limit() -> None:
    current = document(ages=tuple(float(n) for n in range(12)), timeout=100)
    current["consumers"][0]["in_flight_ages_omitted"] = 5
    screen = render(None, current, 0.0, 100)
    assert "... 9 more running" in screen  # 12 - 8 shown + 5 left out of the document


@pytest.mark.parametrize(
    ("given", "wanted"),
    [
        ("http://127.0.0.1:9100", "http://127.0.0.1:9100/status.json"),
        ("http://127.0.0.1:9100/", "http://127.0.0.1:9100/status.json"),
        ("http://127.0.0.1:9100/metrics", "http://127.0.0.1:9100/status.json"),
        ("127.0.0.1:9100/status.json", "http://127.0.0.1:9100/status.json"),
        ("9100", "http://127.0.0.1:9100/status.json"),
        ("https://proxy.example/worker-1/", "https://proxy.example/worker-1/status.json"),
        ("http://[::1]:9100/readyz", "http://[::1]:9100/status.json"),
    ],
)
def test_the_url_may_be_given_with_or_without_a_path(given: str, wanted: str) -> None:
    assert status_url(given) == wanted


def test_a_malformed_url_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="malformed metrics URL"):
        status_url("ftp://127.0.0.1:9100")
    with pytest.raises(ConfigurationError, match="malformed metrics URL"):
        status_url("http://127.0.0.1:port")


# -- errors: nothing there, or not a worker ---------------------------------------------------


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on (bound and closed: the kernel refuses connections)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_an_unreachable_endpoint_is_one_clear_line(closed_port: int) -> None:
    with pytest.raises(StatusUnavailableError) as caught:
        await fetch_status(f"http://127.0.0.1:{closed_port}")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"cannot read http://127.0.0.1:{closed_port}/status.json: ")
    assert "refused" in message.lower()
    assert "--metrics-port" in message

    with pytest.raises(StatusUnavailableError) as failed:
        await watch(f"127.0.0.1:{closed_port}", out=io.StringIO(), iterations=2)
    assert str(failed.value) == message


async def test_something_else_than_a_worker_is_named_as_such() -> None:
    answers = iter(
        [
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n"
            b'Connection: close\r\n\r\n{"up": true}\n',
        ]
    )

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(next(answers))
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    messages = []
    async with server:
        for _ in range(2):
            with pytest.raises(StatusUnavailableError) as caught:
                await fetch_status(f"http://user:s3cret@127.0.0.1:{port}")
            messages.append(str(caught.value))
    not_found, not_ours = messages
    assert "answered HTTP 404: not a steadyrabbit worker's metrics endpoint" in not_found
    assert "not a steadyrabbit metrics endpoint" in not_ours
    assert all("s3cret" not in m and "user:****@" in m for m in (not_found, not_ours))


# -- the live view of a real worker -----------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_watch_a_live_worker(
    queue_name: str, admin: Admin, metrics_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    admin.publish(queue_name, [b"ok"] * 20)
    app = App()
    release = asyncio.Event()

    @app.consumer(queue_name, concurrency=2)
    async def handle(message: Message) -> None:
        if message.body == b"slow":
            await release.wait()

    async with Worker(app, metrics_settings(consumer_timeout=60)) as worker:
        address = worker.metrics_address
        assert address is not None
        await eventually(lambda: worker.stats.acked == 20, what="20 acks")
        await admin.run(admin.publish, queue_name, [b"slow"])
        await eventually(lambda: worker.in_flight == 1, what="the slow handler")
        piped_out = io.StringIO()
        # On the worker's own loop, as `steadyrabbit demo` does: nothing may block it.
        await watch(f"http://{address[0]}:{address[1]}/", interval=0.2, out=piped_out, iterations=2)
        screen = Terminal()
        stop = asyncio.Event()
        view = asyncio.ensure_future(
            watch(f"{address[0]}:{address[1]}", interval=0.05, out=screen, stop=stop)
        )
        await eventually(lambda: screen.getvalue().count("\x1b[2J") >= 2, what="2 frames")
        stop.set()
        await asyncio.wait_for(view, 5)
        release.set()
    piped, terminal = piped_out.getvalue(), screen.getvalue()
    frames = piped.split("\nsteadyrabbit  pid ")
    assert len(frames) == 2, piped
    assert piped.startswith("steadyrabbit  pid ")
    assert not ANSI.search(piped), "no escape codes in a pipe"
    for frame in frames:
        assert queue_name[:30] in frame
        assert "READY" in frame
        assert "amqp://guest:****@127.0.0.1:5672/%2F" in frame
        assert "guest:guest@" not in frame
        assert re.search(r"totals      delivered 21  succeeded 20 ", frame)
        assert re.search(r"\s+\d+\.\ds \[#*\.+\]\s+\d+% of 1m00s", frame), "the running one"
    average = re.search(r"throughput  (\d+\.\d) msg/s succeeded \(avg since start\)", frames[0])
    assert average is not None, frames[0]
    assert float(average.group(1)) > 0, "20 acks since the start"
    assert re.search(r"throughput  0\.0 msg/s succeeded .*\(last 0\.\ds\)", frames[1]), frames[1]
    assert terminal.startswith("\x1b[H\x1b[2J")
    assert "\x1b[32mREADY" in terminal


async def test_the_top_command_prints_one_frame_of_a_live_worker(
    queue_name: str, admin: Admin, metrics_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    admin.publish(queue_name, [b"ok"] * 3)
    app = App()

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        pass

    async with Worker(app, metrics_settings()) as worker:
        address = worker.metrics_address
        assert address is not None
        await eventually(lambda: worker.stats.acked == 3, what="3 acks")
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "steadyrabbit", "top", str(address[1]), "--once"],
            capture_output=True, text=True, timeout=30, check=False,
            env={**os.environ, "STEADYRABBIT_INTERVAL": "0.5"},
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("steadyrabbit  pid "), done.stdout
    assert queue_name[:30] in done.stdout
    assert re.search(r"totals      delivered 3  succeeded 3 ", done.stdout), done.stdout
