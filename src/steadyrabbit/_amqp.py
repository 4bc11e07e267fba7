"""The protocol layer: an awaitable face on pika's asyncio adapter.

pika does the AMQP 0-9-1 framing and heartbeats on the running event loop; this module turns its
callbacks into awaitables, translates its exceptions into steadyrabbit's tree and knows nothing of
consumers, retries or handlers. Everything here must be called from the event-loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import ssl
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import pika
import pika.channel
import pika.exceptions
import pika.frame
import pika.spec
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.adapters.utils import connection_workflow
from pika.adapters.utils.connection_workflow import AMQPConnectorException

from ._errors import (
    AccessRefusedError,
    AuthenticationError,
    BrokerUnreachableError,
    CertificateError,
    ChannelClosedError,
    ClosedByUserError,
    ConfigurationError,
    ConnectionLostError,
    MessageReturnedError,
    PublishRefusedError,
    SteadyRabbitError,
)
from ._frames import read_deliveries
from ._headers import PUBLISH_ID
from ._properties import Properties
from ._url import BrokerAddress

__all__ = [
    "AmqpChannel",
    "AmqpConnection",
    "Deliver",
    "WireProperties",
    "blocking_probe",
    "first_connection",
    "from_wire",
    "parse_version",
    "synthetic_delivery",
    "to_wire",
    "translate_connection_error",
]

#: A delivery's method frame and properties as they came off the wire. Other modules hold them
#: as opaque values and read their attributes (cheap, on the hot path), never build them.
Deliver = pika.spec.Basic.Deliver
WireProperties = pika.spec.BasicProperties
OnMessage = Callable[[pika.channel.Channel, Deliver, WireProperties, bytes], None]

_SCALAR_PROPERTIES = tuple(f.name for f in dataclasses.fields(Properties) if f.name != "headers")


def from_wire(properties: WireProperties, headers: dict[str, Any] | None = None) -> Properties:
    """steadyrabbit's value of wire properties; ``headers`` replaces theirs when given."""
    return Properties(
        headers=dict(properties.headers or {}) if headers is None else headers,
        **{name: getattr(properties, name) for name in _SCALAR_PROPERTIES},
    )


def to_wire(properties: Properties) -> WireProperties:
    return WireProperties(
        headers=dict(properties.headers) if properties.headers else None,
        **{name: getattr(properties, name) for name in _SCALAR_PROPERTIES},
    )


def synthetic_delivery(
    properties: Properties,
    *,
    delivery_tag: int,
    redelivered: bool,
    exchange: str,
    routing_key: str,
) -> tuple[Deliver, WireProperties]:
    """A delivery no broker made, for running a handler without one (the test kit's stub)."""
    deliver = Deliver(
        consumer_tag="stub",
        delivery_tag=delivery_tag,
        redelivered=redelivered,
        exchange=exchange,
        routing_key=routing_key,
    )
    return deliver, to_wire(properties)


def parse_version(value: object) -> tuple[int, ...]:
    """``b"3.10.8"`` or ``"4.0.5+1"`` as (3, 10, 8) or (4, 0, 5); () for anything else."""
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value or "")
    numbers = []
    for part in text.split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        numbers.append(int(digits))
        if len(digits) != len(part):
            break
    return tuple(numbers)


def blocking_probe(host: str, port: int, timeout: float) -> bool:
    """True when a real AMQP connection (open, a channel, close) succeeds as guest/guest.

    Blocking, unlike everything else here: for waiting on a node being started (the test kit).
    """
    params = pika.ConnectionParameters(
        host=host,
        port=port,
        credentials=pika.PlainCredentials("guest", "guest"),
        connection_attempts=1,
        socket_timeout=timeout,
        stack_timeout=timeout,
        blocked_connection_timeout=timeout,
        heartbeat=0,
    )
    try:
        connection = pika.BlockingConnection(params)
    except (pika.exceptions.AMQPError, AMQPConnectorException, OSError):
        # AMQPConnectorException (e.g. AMQPConnectorStackTimeout) is not an AMQPError.
        return False
    try:
        connection.channel().close()
    except (pika.exceptions.AMQPError, OSError):
        return False
    finally:
        with contextlib.suppress(pika.exceptions.AMQPError, OSError):
            if connection.is_open:
                connection.close()
    return True

# AMQP reply codes the broker uses when it closes a connection or channel.
ACCESS_REFUSED = 403
NOT_FOUND = 404
RESOURCE_LOCKED = 405
PRECONDITION_FAILED = 406
CONNECTION_FORCED = 320
NOT_ALLOWED = 530



def translate_connection_error(exc: BaseException, address: BrokerAddress) -> SteadyRabbitError:
    """Map a pika connection failure to steadyrabbit's tree: permanent or transient."""
    # pika nests the real cause: AMQPConnectionError(WorkflowFailed([PhaseError(OSError)])).
    if (
        type(exc) is pika.exceptions.AMQPConnectionError
        and exc.args
        and isinstance(exc.args[0], BaseException)
    ):
        return translate_connection_error(exc.args[0], address)
    if isinstance(exc, connection_workflow.AMQPConnectionWorkflowFailed) and exc.exceptions:
        return translate_connection_error(exc.exceptions[-1], address)
    while isinstance(exc, connection_workflow.AMQPConnectorPhaseErrorBase) and exc.exception:
        exc = exc.exception
    where = address.display
    if isinstance(exc, SteadyRabbitError):
        return exc
    if isinstance(exc, pika.exceptions.ConnectionClosedByClient):
        return ClosedByUserError(f"connection to {where} closed by this process")
    if isinstance(
        exc, pika.exceptions.AuthenticationError | pika.exceptions.ProbableAuthenticationError
    ):
        return _login_refused(address)
    if isinstance(exc, pika.exceptions.ProbableAccessDeniedError):
        return _vhost_refused(address)
    if isinstance(exc, pika.exceptions.ConnectionClosedByBroker):
        if exc.reply_code == ACCESS_REFUSED:
            if "login" in exc.reply_text.lower():
                return _login_refused(address)
            return AccessRefusedError(
                f"the broker at {where} refused access: {exc.reply_text}; "
                "grant the user permissions on this virtual host"
            )
        if exc.reply_code == NOT_ALLOWED:
            return _vhost_refused(address)
        return ConnectionLostError(
            f"connection to {where} closed by the broker: {exc.reply_code} {exc.reply_text}",
            cause="closed_by_broker",
        )
    if isinstance(exc, pika.exceptions.AMQPHeartbeatTimeout):
        return ConnectionLostError(
            f"connection to {where} lost: missed heartbeats ({exc})", cause="missed_heartbeats"
        )
    if isinstance(exc, pika.exceptions.StreamLostError):
        return ConnectionLostError(f"connection to {where} lost: {exc}")
    if isinstance(exc, pika.exceptions.IncompatibleProtocolError):
        return ConnectionLostError(
            f"{where} did not answer as an AMQP 0-9-1 broker ({exc!r})", cause="connect_failed"
        )
    if isinstance(exc, connection_workflow.AMQPConnectorStackTimeout):
        return ConnectionLostError(f"connecting to {where} timed out", cause="connect_failed")
    if isinstance(exc, ssl.SSLError):
        return _tls_refused(exc, where)
    if isinstance(exc, OSError):
        return ConnectionLostError(f"could not connect to {where}: {exc}", cause="connect_failed")
    return ConnectionLostError(f"connection to {where} failed: {exc!r}")


def _login_refused(address: BrokerAddress) -> AuthenticationError:
    return AuthenticationError(
        f"the broker at {address.display} refused the login of user {address.username!r}: "
        "check the user name and password in the URL"
    )


def _vhost_refused(address: BrokerAddress) -> AccessRefusedError:
    return AccessRefusedError(
        f"the broker at {address.display} refused access to virtual host {address.vhost!r} "
        f"for user {address.username!r}: check that it exists and that the user has permissions"
    )


def _translate_channel_error(exc: BaseException) -> SteadyRabbitError:
    if isinstance(exc, pika.exceptions.ChannelClosedByBroker):
        return ChannelClosedError(exc.reply_code, exc.reply_text)
    if isinstance(exc, pika.exceptions.ChannelClosedByClient):
        return ClosedByUserError("channel closed by this process")
    if isinstance(exc, pika.exceptions.ConnectionClosedByClient):
        return ClosedByUserError("connection closed by this process")
    return ConnectionLostError(f"channel lost with its connection: {exc}")


def _connection_parameters(
    address: BrokerAddress, *, heartbeat: int, connect_timeout: float, name: str
) -> pika.ConnectionParameters:
    ssl_options = None
    credentials: pika.PlainCredentials | pika.credentials.ExternalCredentials
    credentials = pika.PlainCredentials(address.username, address.password, erase_on_connect=False)
    if address.tls:
        tls = address.tls_options
        ssl_options = pika.SSLOptions(tls_context(address), tls.server_name or address.host)
        if tls.external_auth:
            credentials = pika.credentials.ExternalCredentials()
    timeout = address.connection_timeout or connect_timeout
    return pika.ConnectionParameters(
        host=address.host,
        port=address.port,
        virtual_host=address.vhost,
        credentials=credentials,
        heartbeat=address.heartbeat if address.heartbeat is not None else heartbeat,
        connection_attempts=1,
        retry_delay=0,
        socket_timeout=timeout,
        stack_timeout=timeout * 2,
        ssl_options=ssl_options,
        client_properties={"connection_name": name, "product": "steadyrabbit"},
    )


def tls_context(address: BrokerAddress) -> ssl.SSLContext:
    """The TLS context of an ``amqps://`` address: the system's CAs or ``cacertfile``, the host
    name checked unless ``verify=verify_none``, and a client certificate if given. A file that
    cannot be read or a wrong passphrase is a :class:`ConfigurationError` in one sentence that
    names the file, never the passphrase."""
    tls = address.tls_options
    where = f"TLS for {address.display}"
    try:
        context = ssl.create_default_context(cafile=tls.cacertfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"{where}: cannot use cacertfile {tls.cacertfile!r}: {_reason(exc)}"
        ) from None
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.certfile is not None:
        try:
            context.load_cert_chain(tls.certfile, tls.keyfile, password=tls.key_password)
        except (OSError, ssl.SSLError) as exc:
            files = f"certfile {tls.certfile!r}" + (
                f" and keyfile {tls.keyfile!r}" if tls.keyfile else ""
            )
            hint = " (or a wrong key_password)" if isinstance(exc, ssl.SSLError) else ""
            raise ConfigurationError(f"{where}: cannot use {files}: {_reason(exc)}{hint}") from None
    return context


# OpenSSL's X509_V_ERR_* codes this client explains.
_UNTRUSTED = {2, 18, 19, 20, 21}  # unknown issuer, self-signed, chain not trusted
_EXPIRED = 10
_NOT_YET_VALID = 9
_HOST_MISMATCH = {62, 64}  # a host name, an IP address


def _tls_refused(exc: ssl.SSLError, where: str) -> CertificateError:
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code in _UNTRUSTED:
            why = "it is not signed by a CA this client trusts (give the URL cacertfile=...)"
        elif code == _EXPIRED:
            why = "it has expired"
        elif code == _NOT_YET_VALID:
            why = "it is not valid yet (is this machine's clock right?)"
        elif code in _HOST_MISMATCH:
            why = (
                f"it was not issued for this host name ({exc.verify_message.rstrip('.')}); "
                "use the name the certificate names, or server_name_indication=..."
            )
        else:
            why = exc.verify_message or _reason(exc)
        return CertificateError(f"TLS with {where} failed: the broker's certificate: {why}")
    return CertificateError(
        f"TLS with {where} failed: {_reason(exc)} (the broker may have refused this client's "
        f"certificate)"
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


class AmqpConnection:
    """One open AMQP connection. ``closed`` resolves, never raises, with the reason it closed."""

    def __init__(self, raw: AsyncioConnection, address: BrokerAddress) -> None:
        self._raw = raw
        self.address = address
        loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[SteadyRabbitError] = loop.create_future()
        self._channels: weakref.WeakSet[AmqpChannel] = weakref.WeakSet()
        self._read_check: asyncio.TimerHandle | None = None
        #: True while the broker blocks this connection's publishes (``connection.blocked``:
        #: a memory or disk alarm); nothing it publishes is confirmed meanwhile.
        self.blocked = False
        raw.add_on_connection_blocked_callback(self._on_blocked)
        raw.add_on_connection_unblocked_callback(self._on_unblocked)

    def _on_blocked(self, _raw: Any, _frame: Any) -> None:
        self.blocked = True

    def _on_unblocked(self, _raw: Any, _frame: Any) -> None:
        self.blocked = False

    @classmethod
    async def open(
        cls, address: BrokerAddress, *, heartbeat: int, connect_timeout: float, name: str
    ) -> AmqpConnection:
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[AmqpConnection] = loop.create_future()
        holder: list[AmqpConnection] = []

        def on_open(raw: Any) -> None:
            read_deliveries(raw)
            connection = cls(raw, address)
            holder.append(connection)
            connection._watch_reads()
            if not opened.done():
                opened.set_result(connection)

        def on_open_error(_raw: Any, exc: BaseException | str) -> None:
            error = exc if isinstance(exc, BaseException) else ConnectionLostError(str(exc))
            if not opened.done():
                opened.set_exception(translate_connection_error(error, address))

        def on_close(_raw: Any, exc: BaseException) -> None:
            if holder:
                holder[0]._on_closed(exc)

        raw = AsyncioConnection(
            _connection_parameters(
                address, heartbeat=heartbeat, connect_timeout=connect_timeout, name=name
            ),
            on_open_callback=on_open,
            on_open_error_callback=on_open_error,
            on_close_callback=on_close,
            custom_ioloop=loop,
        )
        try:
            return await opened
        except asyncio.CancelledError:
            if not raw.is_closed and not raw.is_closing:
                raw.close()
            raise

    def _on_closed(self, exc: BaseException) -> None:
        if self._read_check is not None:
            self._read_check.cancel()
            self._read_check = None
        if not self.closed.done():
            self.closed.set_result(translate_connection_error(exc, self.address))

    def _watch_reads(self) -> None:
        """Declare the broker dead after two heartbeat intervals in which nothing arrived.

        pika checks only every heartbeat + 5 s, so a peer that vanished without a FIN or RST (a
        black hole, a frozen broker) went unnoticed for up to 2 x heartbeat + 10 s. Here the
        byte count pika keeps is looked at a few times per interval: a dead peer is declared
        within two intervals and a fraction of a second, and the supervisor moves on.
        """
        heartbeat = self.negotiated_heartbeat
        if heartbeat <= 0:
            return
        loop = asyncio.get_running_loop()
        tick = min(_READ_CHECK_MAX, heartbeat / 4)
        limit = 2.0 * heartbeat
        last_bytes = self.bytes_received
        last_progress = last_tick = loop.time()

        def check() -> None:
            nonlocal last_bytes, last_progress, last_tick
            now = loop.time()
            received = self.bytes_received
            # A late check means the loop itself stalled: the reader gets its turn first.
            stalled = now - last_tick > 2 * tick
            last_tick = now
            if received != last_bytes or stalled:
                last_bytes, last_progress = received, now
            elif now - last_progress > limit:
                self._read_check = None
                silence = now - last_progress
                self._raw._terminate_stream(  # type: ignore[attr-defined]  # pika's own way out
                    pika.exceptions.AMQPHeartbeatTimeout(
                        f"nothing received for {silence:.1f} s (heartbeat {heartbeat} s)"
                    )
                )
                return
            self._read_check = loop.call_later(tick, check)

        self._read_check = loop.call_later(tick, check)

    @property
    def is_open(self) -> bool:
        return bool(self._raw.is_open)

    @property
    def negotiated_heartbeat(self) -> int:
        # pika stores the value agreed in connection.tune back into its parameters.
        heartbeat = self._raw.params.heartbeat
        return heartbeat if isinstance(heartbeat, int) else 0

    @property
    def server_version(self) -> tuple[int, ...]:
        """The broker's version from its ``connection.start`` properties (e.g. (3, 10, 8));
        () if it did not say."""
        return parse_version((self._raw.server_properties or {}).get("version"))

    @property
    def bytes_received(self) -> int:
        """Bytes read from the broker on this connection so far (pika's own counter)."""
        return int(self._raw.bytes_received)  # type: ignore[attr-defined]  # not in the stubs

    @property
    def server_properties(self) -> dict[str, Any]:
        return dict(getattr(self._raw, "server_properties", None) or {})

    async def channel(self) -> AmqpChannel:
        if not self.is_open:
            raise ConnectionLostError(f"connection to {self.address.display} is not open")
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[pika.channel.Channel] = loop.create_future()

        def on_open(raw_channel: pika.channel.Channel) -> None:
            if not opened.done():
                opened.set_result(raw_channel)

        raw_channel = self._raw.channel(on_open_callback=on_open)
        channel = AmqpChannel(raw_channel, self)
        self._channels.add(channel)
        # If the connection dies before Channel.OpenOk arrives, the close callback fails us.
        def on_closed(closed: asyncio.Future[SteadyRabbitError]) -> None:
            if not opened.done():
                opened.set_exception(closed.result())

        channel.closed.add_done_callback(on_closed)
        await opened
        return channel

    def close(self) -> None:
        """Start closing; ``closed`` resolves with :class:`ClosedByUserError` when done.

        Acks still waiting for the end of this event-loop turn are sent first.
        """
        if not (self._raw.is_closing or self._raw.is_closed):
            for channel in list(self._channels):
                channel.flush_acks()
            self._raw.close()

    async def aclose(self) -> None:
        self.close()
        await self.closed


class AmqpChannel:
    """One channel. Every awaitable fails with the channel's close reason if it closes first."""

    def __init__(self, raw: pika.channel.Channel, connection: AmqpConnection) -> None:
        self.raw = raw
        self.connection = connection
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.closed: asyncio.Future[SteadyRabbitError] = loop.create_future()
        self._pending: set[asyncio.Future[Any]] = set()
        self._confirms: dict[int, asyncio.Future[None]] = {}
        # Publishes waiting for their confirm, by what a basic.return names them by.
        self._returned: dict[str, list[asyncio.Future[None]]] = {}
        self._publish_seq = 0
        self._publish_ids = itertools.count(1)
        # Ack coalescing. The consumer appends every delivery's tag to ``unsettled`` (in
        # delivery order, so ascending) as it arrives; ``ack`` and ``nack`` take them out.
        self.unsettled: deque[int] = deque()
        self._acks_due: set[int] = set()
        self._flush: asyncio.Handle | None = None
        self._on_cancel: Callable[[str], None] | None = None
        raw.add_on_close_callback(self._on_raw_close)
        raw.add_on_cancel_callback(self._on_raw_cancel)

    @property
    def is_open(self) -> bool:
        return bool(self.raw.is_open)

    @property
    def number(self) -> int:
        return int(self.raw.channel_number)

    def _on_raw_close(self, _raw: Any, exc: BaseException) -> None:
        error = _translate_channel_error(exc)
        if not self.closed.done():
            self.closed.set_result(error)
        for future in (*self._pending, *self._confirms.values()):
            if not future.done():
                future.set_exception(error)
        for waiting in self._returned.values():
            for returned in waiting:
                returned.cancel()
        self._pending.clear()
        self._confirms.clear()
        self._returned.clear()

    def _on_raw_cancel(self, frame: pika.frame.Method[Any]) -> None:
        if self._on_cancel is not None:
            self._on_cancel(frame.method.consumer_tag)

    def on_broker_cancel(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(consumer_tag)`` when the broker cancels a consumer (``basic.cancel``)."""
        self._on_cancel = callback

    async def _rpc(self, start: Callable[[Callable[[Any], None]], None]) -> Any:
        if self.closed.done():
            raise self.closed.result()
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending.add(future)

        def done(frame: Any) -> None:
            if not future.done():
                future.set_result(frame)

        try:
            start(done)
            return await future
        except (pika.exceptions.ChannelWrongStateError, pika.exceptions.ConnectionWrongStateError):
            raise ConnectionLostError("channel is not open") from None
        finally:
            self._pending.discard(future)

    async def qos(self, prefetch_count: int) -> None:
        await self._rpc(lambda cb: self.raw.basic_qos(prefetch_count=prefetch_count, callback=cb))

    async def declare_exchange(
        self, name: str, kind: str, *, durable: bool = True, passive: bool = False
    ) -> None:
        await self._rpc(
            lambda cb: self.raw.exchange_declare(
                exchange=name, exchange_type=kind, durable=durable, passive=passive, callback=cb
            )
        )

    async def declare_queue(
        self,
        name: str,
        *,
        durable: bool = True,
        passive: bool = False,
        arguments: dict[str, Any] | None = None,
    ) -> tuple[int, int]:
        """Declare a queue; return its (message count, consumer count)."""
        frame = await self._rpc(
            lambda cb: self.raw.queue_declare(
                queue=name, durable=durable, passive=passive, arguments=arguments, callback=cb
            )
        )
        return int(frame.method.message_count), int(frame.method.consumer_count)

    async def bind_exchange(
        self,
        destination: str,
        source: str,
        routing_key: str,
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        await self._rpc(
            lambda cb: self.raw.exchange_bind(
                destination=destination,
                source=source,
                routing_key=routing_key,
                arguments=None if arguments is None else dict(arguments),
                callback=cb,
            )
        )

    async def bind_queue(
        self,
        queue: str,
        exchange: str,
        routing_key: str,
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        await self._rpc(
            lambda cb: self.raw.queue_bind(
                queue=queue,
                exchange=exchange,
                routing_key=routing_key,
                arguments=None if arguments is None else dict(arguments),
                callback=cb,
            )
        )

    async def consume(
        self, queue: str, on_message: OnMessage, arguments: Mapping[str, Any] | None = None
    ) -> str:
        """Start consuming with manual acks; return the consumer tag once ``ConsumeOk`` came."""
        tags: list[str] = []
        await self._rpc(
            lambda cb: tags.append(
                self.raw.basic_consume(
                    queue=queue,
                    on_message_callback=on_message,
                    arguments=None if arguments is None else dict(arguments),
                    callback=cb,
                )
            )
        )
        return tags[0]

    async def cancel(self, consumer_tag: str) -> None:
        await self._rpc(lambda cb: self.raw.basic_cancel(consumer_tag=consumer_tag, callback=cb))

    async def get(self, queue: str) -> tuple[int, Properties, bytes] | None:
        """``basic.get`` with manual ack: the next ready message of ``queue`` (its delivery
        tag, properties and body), or None."""
        got: list[tuple[int, Properties, bytes]] = []

        def start(cb: Callable[[Any], None]) -> None:
            def on_message(
                _ch: Any,
                method: pika.spec.Basic.GetOk,
                props: pika.spec.BasicProperties,
                body: bytes,
            ) -> None:
                self.raw.callbacks.remove(self.number, pika.spec.Basic.GetEmpty, cb)
                # Always set on a basic.get-ok; pika's spec classes type every field optional.
                got.append((int(method.delivery_tag or 0), from_wire(props), body))
                cb(None)

            # An empty queue answers Basic.GetEmpty instead of GetOk.
            self.raw.add_callback(cb, [pika.spec.Basic.GetEmpty], one_shot=True)
            self.raw.basic_get(queue=queue, callback=on_message, auto_ack=False)

        await self._rpc(start)
        return got[0] if got else None

    async def purge(self, queue: str) -> int:
        """Remove every ready message of ``queue``; return how many."""
        frame = await self._rpc(lambda cb: self.raw.queue_purge(queue=queue, callback=cb))
        return int(frame.method.message_count)

    async def delete_queue(self, queue: str) -> None:
        """Delete ``queue`` with whatever it holds (workers never do; tools and the demo do)."""
        await self._rpc(lambda cb: self.raw.queue_delete(queue=queue, callback=cb))

    async def delete_exchange(self, exchange: str) -> None:
        await self._rpc(lambda cb: self.raw.exchange_delete(exchange=exchange, callback=cb))

    def ack(self, delivery_tag: int) -> None:
        """Ack a delivery at the end of this event-loop turn, coalesced with its neighbours.

        Every ack completed in one turn goes out together: the longest run of settled tags at
        the head of the delivery order as one ``multiple=True`` ack, and any tag completed
        behind a still-running message on its own, at once. No ack waits for a slow handler,
        and none acks a message that has not finished.
        """
        self._acks_due.add(delivery_tag)
        if self._flush is None:
            self._flush = self._loop.call_soon(self.flush_acks)

    def flush_acks(self) -> None:
        """Send the acks due now rather than at the end of this event-loop turn."""
        self._flush = None
        due = self._acks_due
        if not due:
            return
        if not self.raw.is_open:
            due.clear()  # the broker requeues them: nothing to send, nowhere to send it
            return
        unsettled = self.unsettled
        highest = 0
        while unsettled and unsettled[0] in due:
            highest = unsettled.popleft()
            due.discard(highest)
        if highest:
            self.raw.basic_ack(delivery_tag=highest, multiple=True)
        if due:
            for tag in sorted(due):
                self._forget(tag)
                self.raw.basic_ack(delivery_tag=tag, multiple=False)
            due.clear()

    def _forget(self, delivery_tag: int) -> None:
        with contextlib.suppress(ValueError):
            self.unsettled.remove(delivery_tag)

    def nack(self, delivery_tag: int, *, requeue: bool, multiple: bool = False) -> None:
        """Nack now (rare: never for a failed handler). Acks already due go out first, so a
        ``multiple`` nack cannot cover a tag that an earlier ack is about to settle."""
        self.flush_acks()
        if multiple:
            while self.unsettled and self.unsettled[0] <= delivery_tag:
                self.unsettled.popleft()
        else:
            self._forget(delivery_tag)
        try:
            self.raw.basic_nack(delivery_tag=delivery_tag, multiple=multiple, requeue=requeue)
        except pika.exceptions.AMQPError:
            raise ConnectionLostError("channel is not open") from None

    async def enable_confirms(self) -> None:
        self.raw.add_on_return_callback(self._on_return)
        await self._rpc(
            lambda cb: self.raw.confirm_delivery(ack_nack_callback=self._on_confirm, callback=cb)
        )

    def _on_confirm(self, frame: pika.frame.Method[Any]) -> None:
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        tags = (
            [tag for tag in self._confirms if tag <= method.delivery_tag]
            if method.multiple
            else [method.delivery_tag]
        )
        for tag in tags:
            future = self._confirms.pop(tag, None)
            if future is not None and not future.done():
                if acked:
                    future.set_result(None)
                else:
                    future.set_exception(
                        PublishRefusedError(
                            "the broker refused the message (basic.nack: a full queue that "
                            "rejects publishes, or an internal error)"
                        )
                    )

    def _on_return(
        self,
        _raw: Any,
        method: pika.spec.Basic.Return,
        properties: pika.spec.BasicProperties,
        _body: bytes,
    ) -> None:
        publish_id = (properties.headers or {}).get(PUBLISH_ID)
        message_id = properties.message_id
        if isinstance(message_id, bytes):
            message_id = message_id.decode("utf-8", errors="replace")
        key = "n:" + str(publish_id) if publish_id is not None else "id:" + str(message_id)
        waiting = self._returned.get(key)
        if not waiting:
            return
        # Copies with one message id in flight together are returned in the order they
        # were published: the first one waiting is the one returned.
        future = waiting.pop(0)
        if not waiting:
            del self._returned[key]
        if not future.done():
            future.set_exception(
                MessageReturnedError(method.reply_code or 0, str(method.reply_text))
            )

    async def publish_confirmed(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Properties,
    ) -> None:
        """Publish as mandatory on a confirm channel; return once the broker has confirmed it.

        Raises :class:`PublishRefusedError` if the broker nacks it, or closes the channel
        with 403 or 406 because of it; :class:`MessageReturnedError` if no queue matched it;
        what the channel closed with if it closes first.
        """
        if self.closed.done():
            raise self.closed.result()
        wire = to_wire(properties)
        if properties.message_id:
            # A returned message is told by its id: nothing is added to what is published.
            key = f"id:{properties.message_id}"
        else:
            publish_id = str(next(self._publish_ids))
            key = f"n:{publish_id}"
            wire.headers = {**properties.headers, PUBLISH_ID: publish_id}
        self._publish_seq += 1
        confirmed: asyncio.Future[None] = self._loop.create_future()
        returned: asyncio.Future[None] = self._loop.create_future()
        self._confirms[self._publish_seq] = confirmed
        self._returned.setdefault(key, []).append(returned)
        try:
            self.raw.basic_publish(
                exchange=exchange,
                routing_key=routing_key,
                body=body,
                properties=wire,
                mandatory=True,
            )
            await confirmed
            # A basic.return always precedes the basic.ack of the same message.
            if returned.done():
                returned.result()
        except (pika.exceptions.ChannelWrongStateError, pika.exceptions.ConnectionWrongStateError):
            raise ConnectionLostError("channel is not open") from None
        except ChannelClosedError as exc:
            if exc.reply_code in (ACCESS_REFUSED, PRECONDITION_FAILED):
                # A refusal of this message (a foreign user_id, a header the broker cannot
                # route by, no write permission): the same publish would fail the same way.
                raise PublishRefusedError(
                    f"the broker refused the message: {exc.reply_code} {exc.reply_text}",
                    reply_code=exc.reply_code,
                ) from exc
            raise
        finally:
            waiting = self._returned.get(key)
            if waiting and returned in waiting:
                waiting.remove(returned)
                if not waiting:
                    del self._returned[key]
            if not returned.done():
                returned.cancel()

    def close(self) -> None:
        if self.raw.is_open:
            self.flush_acks()
            self.raw.close()


_CLOSE_TIMEOUT = 5.0
# How often, at most, the read watch looks for bytes from the broker (see _watch_reads).
_READ_CHECK_MAX = 0.5


@contextlib.asynccontextmanager
async def first_connection(
    addresses: Sequence[BrokerAddress],
    *,
    heartbeat: int,
    connect_timeout: float,
    name: str,
    unreachable: list[str] | None = None,
) -> AsyncIterator[AmqpConnection]:
    """One connection to the first broker that answers, for one-shot operations (not a worker:
    each address is tried once); closed on the way out.

    Permanent refusals (credentials, permissions) are raised as they are; the errors of the
    brokers that did not answer are appended to ``unreachable`` when given.
    """
    errors = unreachable if unreachable is not None else []
    connection: AmqpConnection | None = None
    for address in addresses:
        try:
            connection = await AmqpConnection.open(
                address, heartbeat=heartbeat, connect_timeout=connect_timeout, name=name
            )
        except ConnectionLostError as exc:
            errors.append(str(exc))
            continue
        break
    if connection is None:
        tried = ", ".join(a.display for a in addresses)
        last = errors[-1] if errors else "?"
        raise BrokerUnreachableError(f"no broker answered (tried {tried}); last error: {last}")
    try:
        yield connection
    finally:
        connection.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await asyncio.shield(connection.closed)
