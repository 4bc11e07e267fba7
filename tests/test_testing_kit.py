"""The public test kit, steadyrabbit.testing: each fault of the FaultProxy against the machine's
broker (or a tiny TCP server where only the bytes matter), a Worker recovering through it, and
what importing the kit loads."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib
import logging
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import pika
import pika.exceptions
import pytest

from steadyrabbit import App, Message, Settings, Worker
from steadyrabbit.testing import Direction, FaultProxy
from tests.conftest import MAIN_URL, Admin, eventually

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

#: The AMQP 0-9-1 protocol header: the broker answers it with connection.start, a method frame.
AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
METHOD_FRAME = b"\x01"
#: Long enough to tell "held" from "delivered" on a loopback, short enough for a fast suite.
QUIET = 0.4

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def raw_client(proxy: FaultProxy) -> AsyncIterator[Stream]:
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def tcp_server() -> AsyncIterator[tuple[int, asyncio.Queue[Stream]]]:
    """A TCP server on 127.0.0.1 that hands each accepted connection to the test."""
    accepted: asyncio.Queue[Stream] = asyncio.Queue()
    writers: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await accepted.put((reader, writer))

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1]), accepted
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


async def read_until_closed(reader: asyncio.StreamReader) -> None:
    """Read until EOF (returns) or a reset (raises)."""
    while await reader.read(65536):
        pass


async def nothing_arrives(reader: asyncio.StreamReader) -> bool:
    try:
        await asyncio.wait_for(reader.read(1), QUIET)
    except TimeoutError:
        return True
    return False


def pika_connection(url: str, heartbeat: int = 0) -> pika.BlockingConnection:
    params = pika.URLParameters(url)
    params.heartbeat = heartbeat
    params.connection_attempts = 1
    params.socket_timeout = 5
    return pika.BlockingConnection(params)


def run_io(connection: pika.BlockingConnection, seconds: float) -> None:
    """Process I/O for a while: raises as soon as the connection is lost."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        connection.process_data_events(time_limit=0.1)


def close_quietly(connection: pika.BlockingConnection) -> None:
    with contextlib.suppress(pika.exceptions.AMQPError, OSError):
        if connection.is_open:
            connection.close()


# -- reset ---------------------------------------------------------------------------------------


async def test_reset_gives_the_client_econnreset() -> None:
    async with FaultProxy(MAIN_URL) as proxy, raw_client(proxy) as (reader, writer):
        writer.write(AMQP_HEADER)
        assert await asyncio.wait_for(reader.read(1), 5) == METHOD_FRAME
        connection = await proxy.wait_for_connection(0)

        assert proxy.reset() == 1
        with pytest.raises(ConnectionResetError) as excinfo:
            await asyncio.wait_for(read_until_closed(reader), 5)
        assert excinfo.value.errno == errno.ECONNRESET == 104
        await connection.wait_closed()
        assert connection.ended_by == "proxy"
        assert not proxy.open_connections


async def test_a_worker_reconnects_after_a_reset(
    queue_name: str, admin: Admin, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    handled: asyncio.Queue[bytes] = asyncio.Queue()
    app = App()

    @app.consumer(queue_name)
    async def record(message: Message) -> None:
        await handled.put(message.body)

    async with FaultProxy(MAIN_URL) as proxy:
        settings = Settings(
            urls=(proxy.url,),
            state_dir=tmp_path,
            connect_timeout=10,
            reconnect_delay=0.1,
            reconnect_delay_max=0.5,
        )
        async with Worker(app, settings) as worker:
            await admin.run(admin.publish, queue_name, [b"before"])
            assert await asyncio.wait_for(handled.get(), 10) == b"before"

            accepted = len(proxy.connections)
            with caplog.at_level(logging.WARNING, logger="steadyrabbit"):
                assert proxy.reset() == accepted  # the consuming and the publishing connection
                await proxy.wait_for_connection(accepted)
                await eventually(lambda: worker.ready, within=10, what="the worker back")
            assert worker.stats.reconnects["connection_lost"] >= 1
            assert "ConnectionResetError(104" in caplog.text

            await admin.run(admin.publish, queue_name, [b"after"])
            assert await asyncio.wait_for(handled.get(), 10) == b"after"


async def test_one_connection_is_reset_and_the_other_left_alone() -> None:
    async with FaultProxy(MAIN_URL) as proxy:
        first = await asyncio.to_thread(pika_connection, proxy.url)
        second = await asyncio.to_thread(pika_connection, proxy.url)
        try:
            assert [c.index for c in proxy.connections] == [0, 1]
            assert proxy.connections[0].reset()

            with pytest.raises(pika.exceptions.StreamLostError, match=r"\(104"):
                await asyncio.to_thread(run_io, first, 5)
            channel = await asyncio.to_thread(second.channel)
            await asyncio.to_thread(channel.queue_declare, "", exclusive=True)
            assert proxy.open_connections == (proxy.connections[1],)
        finally:
            await asyncio.to_thread(close_quietly, first)
            await asyncio.to_thread(close_quietly, second)


async def test_a_reset_by_the_server_is_passed_on_as_a_reset() -> None:
    async with (
        tcp_server() as (port, accepted),
        FaultProxy(("127.0.0.1", port)) as proxy,
        raw_client(proxy) as (reader, _),
    ):
        _, server_writer = await accepted.get()
        server_writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        server_writer.transport.abort()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(read_until_closed(reader), 5)
        assert proxy.connections[0].ended_by == "server"


async def test_an_unreachable_server_resets_the_client_and_lists_nothing() -> None:
    with socket.socket() as placeholder:  # a port nobody listens on
        placeholder.bind(("127.0.0.1", 0))
        closed_port = placeholder.getsockname()[1]
    async with FaultProxy(("127.0.0.1", closed_port)) as proxy, raw_client(proxy) as (reader, _):
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(read_until_closed(reader), 5)
        assert proxy.connections == ()


# -- black hole ----------------------------------------------------------------------------------


async def test_a_black_hole_to_the_server_makes_the_broker_miss_heartbeats() -> None:
    async with FaultProxy(MAIN_URL) as proxy:
        client = await asyncio.to_thread(pika_connection, proxy.url, 1)
        try:
            connection = proxy.connections[0]
            connection.black_hole(Direction.TO_SERVER)
            started = time.monotonic()
            # The broker drops the connection (RabbitMQ resets it), and the client learns it.
            with pytest.raises(pika.exceptions.StreamLostError):
                await asyncio.to_thread(run_io, client, 15)
            assert time.monotonic() - started < 8  # heartbeat 1 s: the broker waits ~2-3 s
            await connection.wait_closed()
            assert connection.ended_by == "server"
            assert connection.bytes_dropped(Direction.TO_SERVER) > 0  # the client's heartbeats
            assert connection.bytes_dropped(Direction.TO_CLIENT) == 0
        finally:
            await asyncio.to_thread(close_quietly, client)


async def test_a_black_hole_drops_for_good() -> None:
    async with FaultProxy(MAIN_URL) as proxy, raw_client(proxy) as (reader, writer):
        connection = await proxy.wait_for_connection(0)
        connection.black_hole(Direction.TO_SERVER)
        writer.write(AMQP_HEADER)
        assert await nothing_arrives(reader)
        assert connection.bytes_dropped(Direction.TO_SERVER) == len(AMQP_HEADER)

        connection.resume()
        assert await nothing_arrives(reader)  # the header never reached the broker
        assert connection.is_open


# -- stall ---------------------------------------------------------------------------------------


async def test_a_stall_holds_the_bytes_until_resumed() -> None:
    async with FaultProxy(MAIN_URL) as proxy, raw_client(proxy) as (reader, writer):
        connection = await proxy.wait_for_connection(0)
        connection.stall(Direction.TO_CLIENT)
        writer.write(AMQP_HEADER)
        assert await nothing_arrives(reader)
        assert connection.bytes_forwarded(Direction.TO_SERVER) == len(AMQP_HEADER)
        assert connection.bytes_forwarded(Direction.TO_CLIENT) == 0

        connection.resume(Direction.TO_CLIENT)
        assert await asyncio.wait_for(reader.read(1), 5) == METHOD_FRAME
        assert connection.bytes_dropped() == 0


async def test_a_stall_of_the_proxy_holds_new_connections_too() -> None:
    async with FaultProxy(MAIN_URL) as proxy:
        proxy.stall()
        async with raw_client(proxy) as (reader, writer):
            writer.write(AMQP_HEADER)
            connection = await proxy.wait_for_connection(0)
            assert await nothing_arrives(reader)
            assert connection.bytes_forwarded() == 0

            proxy.resume()
            assert await asyncio.wait_for(reader.read(1), 5) == METHOD_FRAME


async def test_leaving_the_proxy_closes_a_stalled_connection() -> None:
    async with contextlib.AsyncExitStack() as client_stack:
        async with FaultProxy(MAIN_URL) as proxy:
            # Entered before the proxy is left: the client outlives the proxy.
            reader, writer = await client_stack.enter_async_context(raw_client(proxy))
            connection = await proxy.wait_for_connection(0)
            proxy.stall()
            writer.write(AMQP_HEADER)
        # Left without waiting for the stalled bytes: the client reads a FIN.
        await asyncio.wait_for(read_until_closed(reader), 5)
        assert connection.ended_by == "proxy"
        assert not connection.is_open


# -- latency -------------------------------------------------------------------------------------


async def test_latency_delays_each_direction() -> None:
    async with FaultProxy(MAIN_URL) as proxy:
        proxy.set_latency(0.3, Direction.TO_CLIENT)
        async with raw_client(proxy) as (reader, writer):
            started = time.monotonic()
            writer.write(AMQP_HEADER)
            assert await asyncio.wait_for(reader.read(1), 5) == METHOD_FRAME
            assert 0.3 <= time.monotonic() - started < 1.5

        proxy.set_latency(0)
        async with raw_client(proxy) as (reader, writer):
            started = time.monotonic()
            writer.write(AMQP_HEADER)
            assert await asyncio.wait_for(reader.read(1), 5) == METHOD_FRAME
            assert time.monotonic() - started < 0.3


# -- cut -----------------------------------------------------------------------------------------


async def test_a_cut_closes_one_direction_and_leaves_the_other() -> None:
    async with (
        tcp_server() as (port, accepted),
        FaultProxy(("127.0.0.1", port)) as proxy,
        raw_client(proxy) as (client_reader, client_writer),
    ):
        server_reader, server_writer = await accepted.get()
        connection = await proxy.wait_for_connection(0)

        connection.cut(Direction.TO_CLIENT)
        assert await asyncio.wait_for(client_reader.read(100), 5) == b""  # the client: EOF
        client_writer.write(b"still flowing")
        assert await asyncio.wait_for(server_reader.readexactly(13), 5) == b"still flowing"
        server_writer.write(b"lost")
        await eventually(
            lambda: connection.bytes_dropped(Direction.TO_CLIENT) == 4, what="4 bytes dropped"
        )

        client_writer.write_eof()  # the client hangs up too: its FIN reaches the server
        assert await asyncio.wait_for(server_reader.read(100), 5) == b""
        server_writer.close()
        await asyncio.wait_for(connection.wait_closed(), 5)
        assert connection.ended_by == "proxy"


async def test_a_cut_to_the_broker_makes_it_close_the_connection() -> None:
    async with FaultProxy(MAIN_URL) as proxy, raw_client(proxy) as (reader, writer):
        writer.write(AMQP_HEADER)
        assert await asyncio.wait_for(reader.read(1), 5) == METHOD_FRAME
        proxy.cut(Direction.TO_SERVER)
        connection = proxy.connections[0]
        await asyncio.wait_for(connection.wait_closed(), 5)  # the broker hung up
        # RabbitMQ drops a connection without a clean close (a reset), and the proxy says so.
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(read_until_closed(reader), 5)
        assert connection.ended_by == "proxy"  # the cut came first


# -- the rest of the API -------------------------------------------------------------------------


async def test_urls_through_the_proxy() -> None:
    async with FaultProxy("amqp://user:p%40ss@rabbit.example:5673/prod?heartbeat=2") as proxy:
        assert proxy.target == ("rabbit.example", 5673)
        assert proxy.url == f"amqp://user:p%40ss@127.0.0.1:{proxy.port}/prod?heartbeat=2"
        assert proxy.proxied_url("amqp://other/") == f"amqp://127.0.0.1:{proxy.port}/"
    assert FaultProxy("amqps://rabbit.example").target == ("rabbit.example", 5671)
    with pytest.raises(RuntimeError, match="proxied_url"):
        _ = FaultProxy(("rabbit.example", 5672)).url
    with pytest.raises(ValueError, match="latency"):
        FaultProxy(MAIN_URL).set_latency(-1)


@pytest.mark.parametrize(
    ("statement", "absent"),
    [
        ("import steadyrabbit.testing", "pytest"),
        ("import steadyrabbit", "steadyrabbit.testing"),
    ],
)
def test_what_importing_loads(statement: str, absent: str) -> None:
    check = f"import sys; {statement}; assert {absent!r} not in sys.modules, {absent!r}"
    subprocess.run([sys.executable, "-c", check], check=True, timeout=30)


def test_the_kit_ships_in_the_package() -> None:
    # pyproject's [tool.setuptools.packages.find] must pick the subpackage up, and the top
    # package's py.typed covers it (PEP 561).
    root = Path(__file__).resolve().parent.parent
    setuptools_config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools_config["packages"] == {"find": {"where": ["src"]}}
    assert "py.typed" in setuptools_config["package-data"]["steadyrabbit"]
    setuptools = importlib.import_module("setuptools")  # untyped: no stubs installed
    assert "steadyrabbit.testing" in setuptools.find_namespace_packages(root / "src")
