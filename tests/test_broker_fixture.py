"""The private-node helper itself: isolation, consumer_timeout on 3.10, restarts, cleanup."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pika
import pika.exceptions
import pytest
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from steadyrabbit.testing import find_rabbitmq_bin
from tests._broker import BrokerNode, main_broker_ctl, start_node

REPO = Path(__file__).resolve().parent.parent


def _params(node: BrokerNode) -> pika.URLParameters:
    params = pika.URLParameters(node.url)
    params.connection_attempts = 1
    params.socket_timeout = 5
    return params


def _drain(conn: pika.BlockingConnection, seconds: float) -> None:
    """Process I/O for a while: raises as soon as the broker closes the connection."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.1)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not reaped yet by its new parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerNode]:
    n = start_node(
        tmp_path_factory.mktemp("broker"), consumer_timeout_ms=5000, channel_tick_interval_ms=1000
    )
    try:
        yield n
    finally:
        n.stop()


@pytest.mark.private_node
def test_node_is_private_and_configured(node: BrokerNode) -> None:
    assert node.nodename != "rabbit@localhost"
    assert node.port != 5672
    assert node.url == f"amqp://guest:guest@127.0.0.1:{node.port}/%2F"
    assert node.ctl("eval", "node().").strip() == node.nodename
    settings = node.ctl(
        "eval",
        "{application:get_env(rabbit, consumer_timeout),"
        " application:get_env(rabbit, channel_tick_interval)}.",
    )
    assert settings.strip() == "{{ok,5000},{ok,1000}}"
    assert (node.home / ".erlang.cookie").is_file()


@pytest.mark.private_node
def test_unacked_delivery_closes_the_channel_with_precondition_failed(node: BrokerNode) -> None:
    conn = pika.BlockingConnection(_params(node))
    try:
        ch = conn.channel()
        queue = ch.queue_declare("", exclusive=True).method.queue
        ch.basic_publish("", queue, b"never acked")
        delivered: list[float] = []

        def on_message(
            _ch: BlockingChannel, _method: Basic.Deliver, _props: BasicProperties, _body: bytes
        ) -> None:
            delivered.append(time.monotonic())  # and never ack

        ch.basic_qos(prefetch_count=1)
        ch.basic_consume(queue, on_message, auto_ack=False)
        conn.call_later(30, ch.stop_consuming)  # safety net: the test fails instead of hanging
        # start_consuming() raises when the broker closes the channel (process_data_events
        # only returns; the closed channel raises ChannelWrongStateError on next use).
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as excinfo:
            ch.start_consuming()
        closed_after = time.monotonic() - delivered[0]
        assert excinfo.value.reply_code == 406
        assert "PRECONDITION_FAILED" in excinfo.value.reply_text
        assert "timed out" in excinfo.value.reply_text
        # consumer_timeout 5 s, checked every 1 s tick -> fires after 5-6 s.
        assert 4.5 <= closed_after <= 10, closed_after
        assert conn.is_open  # only the channel is closed
    finally:
        if conn.is_open:
            conn.close()


@pytest.mark.private_node
def test_close_all_connections(node: BrokerNode) -> None:
    conn = pika.BlockingConnection(_params(node))
    try:
        node.close_all_connections("test: bye")
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as excinfo:
            _drain(conn, 5)
        assert excinfo.value.reply_code == 320
        assert "test: bye" in excinfo.value.reply_text
    finally:
        if conn.is_open:
            conn.close()


@pytest.mark.private_node
def test_stop_app_start_app_round_trip(node: BrokerNode) -> None:
    conn = pika.BlockingConnection(_params(node))
    ch = conn.channel()
    ch.queue_declare("roundtrip", durable=True)
    ch.confirm_delivery()
    ch.basic_publish("", "roundtrip", b"persistent", pika.BasicProperties(delivery_mode=2))

    node.stop_app()
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        _drain(conn, 5)
    assert not _port_open(node.port)
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(_params(node))
    assert node.is_running()  # the Erlang VM stays up

    node.start_app()  # returns only once AMQP works
    with pika.BlockingConnection(_params(node)) as conn2:
        ch2 = conn2.channel()
        method, _props, body = ch2.basic_get("roundtrip", auto_ack=True)
        assert method is not None
        assert body == b"persistent"
        ch2.queue_delete("roundtrip")


@pytest.mark.private_node
def test_failed_start_raises_with_the_log(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no_such_setting") as excinfo:
        start_node(tmp_path, extra_conf="no_such_setting = 1")
    assert "exited with code" in str(excinfo.value)


@pytest.mark.private_node
@pytest.mark.slow  # waits out broker timeouts or processes: CI's slow pass
def test_stop_is_idempotent_and_leaves_nothing(tmp_path: Path) -> None:
    with start_node(tmp_path) as n:  # leaving the block stops it
        pid, port = n.pid, n.port
        assert pid is not None
    n.stop()
    assert n.pid is None
    assert not n.is_running()
    assert not _pid_alive(pid)
    assert not _port_open(port)
    epmd = subprocess.run(["epmd", "-names"], capture_output=True, text=True, check=False)
    assert n.nodename.split("@")[0] not in epmd.stdout
    with pytest.raises(RuntimeError, match="not running"):
        n.wait_ready(timeout=1)


def test_the_machines_rabbitmq_is_found_and_a_wrong_one_refused(tmp_path: Path) -> None:
    assert find_rabbitmq_bin() == Path("/usr/lib/rabbitmq/bin")  # Debian's package
    with pytest.raises(FileNotFoundError, match=r"no rabbitmq-server in .*: rabbitmq_bin is"):
        start_node(tmp_path, rabbitmq_bin=tmp_path)


_ORPHAN_SCRIPT = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from tests._broker import start_node
n = start_node(Path(sys.argv[1]))
print(n.pid, n.port, flush=True)
time.sleep(600)
"""


@pytest.mark.private_node
@pytest.mark.slow  # waits out broker timeouts or processes: CI's slow pass
def test_node_dies_with_a_killed_test_process(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN_SCRIPT, str(tmp_path), str(REPO)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line, "child failed to start a node"
        pid, port = (int(x) for x in line.split())
        assert _port_open(port)
    finally:
        child.kill()  # SIGKILL: no atexit, no finally
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    deadline = time.monotonic() + 30
    while (_pid_alive(pid) or _port_open(port)) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = _pid_alive(pid)
    if alive:  # do not leave it behind even if the test fails
        os.killpg(pid, signal.SIGKILL)
    assert not alive
    assert not _port_open(port)


def test_main_broker_ctl_reaches_the_main_broker() -> None:
    assert main_broker_ctl("eval", "node().").strip() == "rabbit@localhost"
    assert "/" in main_broker_ctl("list_vhosts", "--quiet").split()
