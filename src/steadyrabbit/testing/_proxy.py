"""A TCP fault proxy: put it between a client and a broker (or any TCP server) and break the
network on purpose, from a test, without root, iptables or ``rabbitmqctl``.

::

    async with FaultProxy(node.url) as proxy:            # listens on 127.0.0.1, a free port
        async with Worker(app, Settings(urls=(proxy.url,))) as worker:
            proxy.reset()                                 # the worker reads ECONNRESET (104)

Every byte goes through the proxy in both directions: ``Direction.TO_SERVER`` (client → server)
and ``Direction.TO_CLIENT`` (server → client). A fault method takes a ``direction`` (both by
default). The faults:

``reset()``
    Resets the connection: SO_LINGER 0, then close, so both peers get a TCP RST and read
    ``ConnectionResetError`` (errno 104, ``ECONNRESET``), not a clean close. The incident's
    failure. Irreversible.
``stall(direction)``
    Holds the bytes without closing anything: nothing more is delivered, nothing is lost.
    TCP flow control pushes back on the sender once the buffers fill. :meth:`resume` delivers
    what was held, in order. A stall of ``TO_CLIENT`` looks like a hung broker; of both
    directions, like a network that silently stopped.
``black_hole(direction)``
    Drops the bytes silently, the connection still open (a firewall that drops packets, a
    half-dead NAT entry). Unlike a stall, what was dropped never arrives, and a FIN is dropped
    too; the AMQP stream is then broken for good, so let the peers time out (missed
    heartbeats) or reset it. A black hole of ``TO_SERVER`` with a heartbeat of 1-2 s makes the
    broker miss the client's heartbeats and close the connection.
``resume(direction)``
    Ends a stall or a black hole: bytes flow again.
``set_latency(seconds, direction)``
    Delivers each chunk ``seconds`` after it was read (order kept, throughput not limited).
    ``set_latency(0)`` removes it.
``cut(direction)``
    Closes one direction cleanly: the receiver of that direction reads end of file (a FIN)
    while the other direction keeps flowing, and later bytes of the cut direction are dropped.
    ``cut(Direction.TO_CLIENT)`` is a server that hung up as far as the client can tell, while
    the server still receives. Irreversible.

A peer's own reset is passed on as a reset, and its FIN as a FIN (half-close), so the proxy is
invisible until a fault is set.

Faults apply to one connection (:class:`ProxiedConnection`, from :attr:`FaultProxy.connections`
in the order the proxy accepted them, or :meth:`FaultProxy.wait_for_connection`) or, through the
same methods of :class:`FaultProxy`, to every open connection. ``stall``, ``black_hole``,
``resume`` and ``set_latency`` on the proxy also apply to the connections accepted later (a
network partition stays until it is healed); ``reset`` and ``cut`` are events that touch only
the connections open at the time, so a client can reconnect through the proxy at once.

A connection is listed once the proxy has connected to the server for it; when the server
cannot be reached, the client's connection is reset and not listed. The proxy runs on the event
loop that enters it (asyncio only, no thread); every task it starts ends before ``async with``
returns, and leaving it closes the open connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

__all__ = ["Direction", "FaultProxy", "ProxiedConnection"]

_CHUNK = 65536
# Chunks read but not yet delivered, per direction. Bounded so that a stalled direction pushes
# back on its sender (TCP flow control) instead of buffering without limit in the test process.
_QUEUED_CHUNKS = 16
_DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}

Side = Literal["client", "server", "proxy"]


class Direction(enum.Enum):
    """Which way bytes travel: a fault applies to one direction or to ``BOTH``."""

    TO_SERVER = "to_server"  #: client → server
    TO_CLIENT = "to_client"  #: server → client
    BOTH = "both"

    def _each(self) -> tuple[Direction, ...]:
        if self is Direction.BOTH:
            return (Direction.TO_SERVER, Direction.TO_CLIENT)
        return (self,)


class _Mode(enum.Enum):
    FORWARD = "forward"
    STALL = "stall"
    BLACK_HOLE = "black hole"


@dataclass
class _FlowSettings:
    """What a direction does with its bytes: the proxy keeps one per direction as the default
    for the connections it accepts next."""

    mode: _Mode = _Mode.FORWARD
    latency: float = 0.0


@dataclass(eq=False)
class _Flow:
    """One direction of one connection."""

    settings: _FlowSettings
    cut: bool = False
    forwarded: int = 0
    dropped: int = 0
    # Set unless stalled: the writer waits on it before it delivers a chunk.
    flowing: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.apply(self.settings)

    def apply(self, settings: _FlowSettings) -> None:
        self.settings = _FlowSettings(settings.mode, settings.latency)
        if settings.mode is _Mode.STALL:
            self.flowing.clear()
        else:
            self.flowing.set()

    @property
    def dropping(self) -> bool:
        return self.cut or self.settings.mode is _Mode.BLACK_HOLE


def _reset_transport(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the peer gets a RST (ECONNRESET), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _close_transport(writer: asyncio.StreamWriter) -> None:
    # Bytes still buffered for a peer that stopped reading would keep the socket open: the
    # connection is over, so reset it instead of waiting.
    if writer.transport.get_write_buffer_size():
        _reset_transport(writer)
    else:
        writer.close()


class ProxiedConnection:
    """One client connection through a :class:`FaultProxy`, and its faults.

    ``index`` is its position in :attr:`FaultProxy.connections` (0 for the first accepted).
    """

    def __init__(
        self,
        index: int,
        client: asyncio.StreamWriter,
        server: asyncio.StreamWriter,
        defaults: dict[Direction, _FlowSettings],
        task: asyncio.Task[None],
    ) -> None:
        self.index = index
        #: The client's (host, port): match it against a client socket's local address.
        self.client_address: tuple[str, int] = client.get_extra_info("peername")[:2]
        #: Who ended it first: the client or the server (a FIN or a reset), or the proxy (a
        #: fault, or the proxy's exit); None while nobody has.
        self.ended_by: Side | None = None
        self._writers = {Direction.TO_SERVER: server, Direction.TO_CLIENT: client}
        self._flows = {d: _Flow(defaults[d]) for d in Direction.BOTH._each()}
        self._task = task
        self._closed = asyncio.Event()

    def __repr__(self) -> str:
        state = "open" if self.is_open else f"ended by {self.ended_by}"
        return f"<ProxiedConnection {self.index} from {self.client_address}, {state}>"

    @property
    def is_open(self) -> bool:
        return not self._closed.is_set()

    async def wait_closed(self) -> None:
        """Return once both sockets of this connection are closed."""
        await self._closed.wait()

    def bytes_forwarded(self, direction: Direction = Direction.BOTH) -> int:
        """Bytes delivered in ``direction`` so far."""
        return sum(self._flows[d].forwarded for d in direction._each())

    def bytes_dropped(self, direction: Direction = Direction.BOTH) -> int:
        """Bytes a black hole or a cut dropped in ``direction`` so far."""
        return sum(self._flows[d].dropped for d in direction._each())

    def reset(self) -> bool:
        """Reset both sides (RST); return False if the connection was already closed."""
        if not self.is_open:
            return False
        self._ended("proxy")
        for writer in self._writers.values():
            _reset_transport(writer)
        # Its tasks may be waiting on a stalled flow: stop them instead of waiting for EOF.
        self._task.cancel()
        return True

    def stall(self, direction: Direction = Direction.BOTH) -> None:
        """Hold the bytes of ``direction`` until :meth:`resume`."""
        self._set(direction, mode=_Mode.STALL)

    def black_hole(self, direction: Direction = Direction.BOTH) -> None:
        """Drop the bytes of ``direction`` (and its FIN) until :meth:`resume`."""
        self._set(direction, mode=_Mode.BLACK_HOLE)

    def resume(self, direction: Direction = Direction.BOTH) -> None:
        """End a stall or black hole of ``direction``."""
        self._set(direction, mode=_Mode.FORWARD)

    def set_latency(self, seconds: float, direction: Direction = Direction.BOTH) -> None:
        """Deliver each chunk of ``direction`` read from now on ``seconds`` later."""
        if seconds < 0:
            raise ValueError(f"latency must be >= 0, not {seconds}")
        self._set(direction, latency=seconds)

    def cut(self, direction: Direction = Direction.BOTH) -> None:
        """Send a FIN to the receiver of ``direction`` and drop its later bytes."""
        for each in direction._each():
            flow = self._flows[each]
            if flow.cut or not self.is_open:
                continue
            flow.cut = True
            self._ended("proxy")
            # A writer held by a stall must move on (and drop what it holds), or the flow
            # could never end.
            flow.flowing.set()
            writer = self._writers[each]
            if not writer.is_closing() and writer.can_write_eof():
                with contextlib.suppress(OSError, RuntimeError):
                    writer.write_eof()

    def _set(
        self, direction: Direction, *, mode: _Mode | None = None, latency: float | None = None
    ) -> None:
        for each in direction._each():
            flow = self._flows[each]
            flow.apply(
                _FlowSettings(
                    flow.settings.mode if mode is None else mode,
                    flow.settings.latency if latency is None else latency,
                )
            )

    def _ended(self, by: Side) -> None:
        if self.ended_by is None:
            self.ended_by = by

    async def _run(self, client: asyncio.StreamReader, server: asyncio.StreamReader) -> None:
        readers = {Direction.TO_SERVER: client, Direction.TO_CLIENT: server}
        try:
            async with asyncio.TaskGroup() as flows:
                for direction, reader in readers.items():
                    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(_QUEUED_CHUNKS)
                    flows.create_task(self._read(direction, reader, queue))
                    flows.create_task(self._deliver(direction, queue))
        finally:
            for writer in self._writers.values():
                _close_transport(writer)
            self._ended("proxy")
            self._closed.set()

    async def _read(
        self,
        direction: Direction,
        reader: asyncio.StreamReader,
        queue: asyncio.Queue[tuple[float, bytes] | None],
    ) -> None:
        flow = self._flows[direction]
        source: Side = "client" if direction is Direction.TO_SERVER else "server"
        loop = asyncio.get_running_loop()
        try:
            while data := await reader.read(_CHUNK):
                if flow.dropping:
                    flow.dropped += len(data)
                else:
                    await queue.put((loop.time() + flow.settings.latency, data))
        except OSError:
            # The source reset its side (or its socket failed): pass a reset on.
            self._ended(source)
            self.reset()
            return
        self._ended(source)
        await queue.put(None)  # end of file, delivered after what was read before it

    async def _deliver(
        self, direction: Direction, queue: asyncio.Queue[tuple[float, bytes] | None]
    ) -> None:
        flow = self._flows[direction]
        writer = self._writers[direction]
        loop = asyncio.get_running_loop()
        while (item := await queue.get()) is not None:
            read_at_plus_latency, data = item
            if (delay := read_at_plus_latency - loop.time()) > 0:
                await asyncio.sleep(delay)
            await flow.flowing.wait()
            if flow.dropping or writer.is_closing():
                flow.dropped += len(data)
                continue
            writer.write(data)
            flow.forwarded += len(data)
            try:
                await writer.drain()
            except OSError:
                self.reset()  # the receiver reset its side: pass the reset on
                return
        if not flow.dropping and not writer.is_closing() and writer.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                writer.write_eof()


class FaultProxy:
    """A TCP proxy on ``listen_host`` (127.0.0.1 by default; ``listen_port`` 0 picks a free
    port) in front of ``target``: a broker URL (``amqp://user:pass@host:port/vhost``, then
    :attr:`url` is the same URL through the proxy) or a ``(host, port)`` pair.

    Use as ``async with``. The faults are described in this module's docstring.
    """

    def __init__(
        self,
        target: str | tuple[str, int],
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        if isinstance(target, str):
            parts = urlsplit(target)
            if parts.hostname is None:
                raise ValueError(f"no host in the URL {target!r}")
            port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
            if port is None:
                raise ValueError(f"no port in the URL {target!r}, and no default for its scheme")
            self._target: tuple[str, int] = (parts.hostname, port)
            self._target_url: str | None = target
        else:
            self._target = target
            self._target_url = None
        self._listen = (listen_host, listen_port)
        self._server: asyncio.Server | None = None
        self._connections: list[ProxiedConnection] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepted = asyncio.Condition()
        self._defaults = {d: _FlowSettings() for d in Direction.BOTH._each()}
        self.host = listen_host
        self.port = listen_port

    def __repr__(self) -> str:
        return (
            f"<FaultProxy {self.host}:{self.port} -> {self._target[0]}:{self._target[1]}, "
            f"{len(self.open_connections)} open>"
        )

    @property
    def target(self) -> tuple[str, int]:
        """The server's (host, port)."""
        return self._target

    @property
    def url(self) -> str:
        """The target URL, through the proxy (for a proxy made from a URL)."""
        if self._target_url is None:
            raise RuntimeError("this proxy was given a (host, port): use proxied_url(url)")
        return self.proxied_url(self._target_url)

    def proxied_url(self, url: str) -> str:
        """``url`` (credentials, virtual host, query) with the proxy's host and port."""
        parts = urlsplit(url)
        credentials, at, _ = parts.netloc.rpartition("@")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return urlunsplit(parts._replace(netloc=f"{credentials}{at}{host}:{self.port}"))

    @property
    def connections(self) -> tuple[ProxiedConnection, ...]:
        """Every connection accepted so far, open or not, in the order accepted."""
        return tuple(self._connections)

    @property
    def open_connections(self) -> tuple[ProxiedConnection, ...]:
        return tuple(c for c in self._connections if c.is_open)

    async def wait_for_connection(self, index: int) -> ProxiedConnection:
        """Return ``connections[index]``, once the proxy has accepted that many.

        ``await proxy.wait_for_connection(len(proxy.connections))`` waits for the next one.
        """
        if index < 0:
            raise ValueError(f"a connection index is >= 0, not {index}")
        async with self._accepted:
            await self._accepted.wait_for(lambda: len(self._connections) > index)
        return self._connections[index]

    def reset(self) -> int:
        """Reset every open connection (RST both ways); return how many. The proxy keeps
        accepting, so clients can reconnect through it at once."""
        return sum(connection.reset() for connection in self.open_connections)

    def cut(self, direction: Direction = Direction.BOTH) -> None:
        """Cut ``direction`` of every open connection (see :meth:`ProxiedConnection.cut`)."""
        for connection in self.open_connections:
            connection.cut(direction)

    def stall(self, direction: Direction = Direction.BOTH) -> None:
        """Hold ``direction``'s bytes, on every connection, open or accepted later."""
        self._set(direction, _Mode.STALL, None)

    def black_hole(self, direction: Direction = Direction.BOTH) -> None:
        """Drop ``direction``'s bytes, on every connection, open or accepted later."""
        self._set(direction, _Mode.BLACK_HOLE, None)

    def resume(self, direction: Direction = Direction.BOTH) -> None:
        """End stalls and black holes of ``direction``, on every connection."""
        self._set(direction, _Mode.FORWARD, None)

    def set_latency(self, seconds: float, direction: Direction = Direction.BOTH) -> None:
        """Delay ``direction`` by ``seconds``, on every connection, open or accepted later."""
        if seconds < 0:
            raise ValueError(f"latency must be >= 0, not {seconds}")
        self._set(direction, None, seconds)

    def _set(self, direction: Direction, mode: _Mode | None, latency: float | None) -> None:
        for each in direction._each():
            default = self._defaults[each]
            self._defaults[each] = _FlowSettings(
                default.mode if mode is None else mode,
                default.latency if latency is None else latency,
            )
            for connection in self.open_connections:
                connection._set(each, mode=mode, latency=latency)

    async def __aenter__(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, *self._listen)
        self.host, self.port = self._server.sockets[0].getsockname()[:2]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for connection in self.open_connections:
            connection._ended("proxy")
        for task in self._tasks:
            task.cancel()  # each closes its sockets on the way out
        if self._tasks:
            await asyncio.wait(self._tasks)
        await self._server.wait_closed()  # after the connections: it waits for them on 3.12
        failures = _failures(self._tasks)
        self._tasks.clear()
        if failures and exc is None:
            raise BaseExceptionGroup("the fault proxy failed", failures)

    def _accept(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        # A plain callback: asyncio would run a coroutine in a task of its own, which the
        # proxy could not cancel cleanly (3.11 logs a cancelled one as an error).
        task = asyncio.get_running_loop().create_task(self._serve(client_reader, client_writer))
        # Kept (not discarded when done) until the proxy exits, which collects any failure.
        self._tasks.add(task)

    async def _serve(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            server_reader, server_writer = await asyncio.open_connection(*self._target)
        except BaseException as error:
            # Unreachable server (or the proxy is leaving): the client's connection goes too.
            _reset_transport(client_writer)
            if isinstance(error, OSError):
                return
            raise
        connection = ProxiedConnection(
            len(self._connections), client_writer, server_writer, self._defaults, task
        )
        self._connections.append(connection)
        async with self._accepted:
            self._accepted.notify_all()
        await connection._run(client_reader, server_reader)


def _failures(tasks: Iterable[asyncio.Task[None]]) -> list[BaseException]:
    """What the connections' tasks raised (a bug of the proxy: faults are not failures)."""
    return [
        error for task in tasks if not task.cancelled() and (error := task.exception()) is not None
    ]
