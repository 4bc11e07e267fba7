"""Publishing for users: :class:`Publisher` (async), :class:`BlockingPublisher` (sync, any
thread), and the same API bound to a worker's publishing connection for its handlers.

Every publish is confirmed by the broker before ``publish`` returns, and is mandatory: a
message no queue takes raises :class:`UnroutableError` instead of vanishing. A connection lost
before the confirm is reconnected (the consumers' supervisor and backoff) and the message sent
again, so a message may arrive twice but is never lost; each carries a ``message_id`` (one is
made when none is given) by which an idempotent consumer runs it once. ``timeout`` bounds a
publish: a broker that blocks publishers (a memory or disk alarm) or cannot be reached raises
:class:`PublishTimeoutError` instead of hanging.

How a publish travels::

    publish(body, ...)        encode the body, give it an id -> Published
      around_publish ...      every middleware that overrides it, first in the list outermost
        transport.send        the broker (ConfirmedPublisher), or a list (the test stub)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from types import TracebackType
from typing import Any, Protocol

from ._errors import (
    ClosedByUserError,
    ConfigurationError,
    PublishTimeoutError,
    SteadyRabbitError,
)
from ._middleware import Hooks, Middleware, Publish
from ._outbound import Published, encode_body, new_message_id
from ._properties import Properties
from ._publisher import ConfirmedPublisher
from ._settings import Settings
from ._stats import Stats
from ._supervisor import Supervisor

_PERSISTENT = 2
_TRANSIENT = 1


class Transport(Protocol):
    """Where a prepared publish goes."""

    async def send(self, published: Published) -> None: ...

    def why_unconfirmed(self) -> str:
        """Why a publish may be waiting for its confirm, for a timeout's message."""
        ...


class BrokerTransport:
    """To the broker, confirmed, through reconnects (:class:`ConfirmedPublisher`)."""

    def __init__(self, engine: ConfirmedPublisher) -> None:
        self._engine = engine

    async def send(self, published: Published) -> None:
        properties = Properties(
            headers=dict(published.headers),
            content_type=published.content_type,
            message_id=published.message_id,
            delivery_mode=_PERSISTENT if published.persistent else _TRANSIENT,
        )
        delay_ms = None if published.delay is None else max(1, round(published.delay * 1000))
        await self._engine.publish(
            published.exchange,
            published.routing_key,
            published.body,
            properties,
            delay_ms=delay_ms,
        )

    def why_unconfirmed(self) -> str:
        blocked = self._engine.blocked
        if blocked is None:
            return "no connection to the broker (it is being re-established)"
        if blocked:
            return "the broker blocks publishing (a memory or disk alarm: connection.blocked)"
        return "the broker did not confirm it"


class Publisher:
    """Publishes with confirms, from async code. Use as ``async with Publisher(settings) as
    publisher: await publisher.publish(...)``; it keeps a connection of its own.

    ``settings``: a :class:`Settings`, a broker URL, or None for the local broker.
    ``timeout``: seconds a publish may take, reconnects and alarms included, before
    :class:`PublishTimeoutError`. ``middleware``: their ``around_publish`` wrap every publish.
    """

    def __init__(
        self,
        settings: Settings | str | None = None,
        *,
        timeout: float = 30.0,
        middleware: Sequence[Middleware] = (),
    ) -> None:
        if not (isinstance(timeout, (int, float)) and timeout > 0 and math.isfinite(timeout)):
            raise ConfigurationError(
                f"the publish timeout must be a number of seconds > 0, not {timeout!r}"
            )
        if settings is None:
            settings = Settings()
        elif isinstance(settings, str):
            settings = Settings(url=settings)
        #: None when bound to a transport it does not own (see :meth:`over`).
        self._settings: Settings | None = settings
        self._timeout = float(timeout)
        self._hooks = Hooks(middleware)
        self._transport: Transport | None = None
        self._supervisor: Supervisor | None = None
        self._engine: ConfirmedPublisher | None = None
        self._running: asyncio.Task[None] | None = None

    @classmethod
    def over(cls, transport: Transport, hooks: Hooks, *, timeout: float = 30.0) -> Publisher:
        """A publisher on ``transport`` (a worker's connection, a test's list), which it
        neither opens nor closes."""
        publisher = cls(timeout=timeout)
        publisher._settings = None
        publisher._hooks = hooks
        publisher._transport = transport
        return publisher

    async def __aenter__(self) -> Publisher:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Connect (within ``settings.connect_timeout``); raises what the connection failed
        with (:class:`BrokerUnreachableError`, :class:`AuthenticationError`, ...)."""
        settings = self._settings
        if settings is None or self._running is not None:
            return
        supervisor = Supervisor(settings, Stats(), role="publish", hooks=self._hooks)
        self._supervisor = supervisor
        self._running = asyncio.get_running_loop().create_task(
            supervisor.run(), name="steadyrabbit publisher connection"
        )
        try:
            await supervisor.connection()
        except BaseException:
            await self.close()
            raise
        self._engine = ConfirmedPublisher(supervisor)
        self._transport = BrokerTransport(self._engine)

    async def close(self) -> None:
        """Close the connection; publishing afterwards raises :class:`ClosedByUserError`."""
        if self._settings is None:
            return  # bound to a worker or a test: theirs to close
        self._transport = None
        if self._engine is not None:
            self._engine.close()
        if self._supervisor is not None:
            self._supervisor.close()
        running, self._running = self._running, None
        if running is not None:
            # Its error (a refused login, say) was raised to whoever waited for the connection.
            with contextlib.suppress(SteadyRabbitError):
                await running

    async def publish(
        self,
        body: object,
        *,
        exchange: str = "",
        routing_key: str,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        content_type: str | None = None,
        persistent: bool = True,
        delay: float | timedelta | None = None,
    ) -> str:
        """Publish ``body`` and return its message id once the broker confirmed it.

        ``body``: bytes as they are; text as UTF-8; JSON data, a dataclass or a pydantic
        model as JSON (with its content type). ``delay`` (seconds or a timedelta) holds the
        message in steadyrabbit's delay queue first: no plugin. Raises
        :class:`UnroutableError` (no queue takes it), :class:`PublishRefusedError` (the broker
        refused it), :class:`PublishTimeoutError` (not confirmed within the timeout).
        """
        published = prepare(
            body,
            exchange=exchange,
            routing_key=routing_key,
            headers=headers,
            message_id=message_id,
            content_type=content_type,
            persistent=persistent,
            delay=delay,
        )
        transport = self._transport
        if transport is None:
            raise ClosedByUserError(
                "the publisher is not open: use `async with Publisher(...) as publisher`"
            )
        deadline = asyncio.timeout(self._timeout)
        try:
            async with deadline:
                if self._hooks.around_publish:
                    await self._through_middleware(transport, published)
                else:
                    await transport.send(published)
        except TimeoutError:
            if not deadline.expired():
                raise
            where = f"exchange {exchange!r}" if exchange else "the default exchange"
            raise PublishTimeoutError(
                f"a publish to {where} (routing key {routing_key!r}) was not confirmed within "
                f"{self._timeout:g} s: {transport.why_unconfirmed()}; it may still arrive, and "
                f"sending it again with message_id {published.message_id!r} lets an idempotent "
                f"consumer run it once"
            ) from None
        return published.message_id

    async def _through_middleware(self, transport: Transport, published: Published) -> None:
        async def send(publish: Publish) -> None:
            # What the middleware left of it goes out (a tracing context added to the headers).
            await transport.send(
                replace(
                    published,
                    exchange=publish.exchange,
                    routing_key=publish.routing_key,
                    body=publish.body,
                    headers=publish.headers,
                )
            )

        await self._hooks.wrap_publish(send)(
            Publish(
                published.exchange,
                published.routing_key,
                published.body,
                dict(published.headers),
                message_id=published.message_id,
            )
        )


def prepare(
    body: object,
    *,
    exchange: str,
    routing_key: str,
    headers: Mapping[str, Any] | None,
    message_id: str | None,
    content_type: str | None,
    persistent: bool,
    delay: float | timedelta | None,
) -> Published:
    """Check a publish's arguments (one sentence for a wrong one) and encode its body."""
    if not isinstance(exchange, str):
        raise ConfigurationError(f"exchange must be a string, not {type(exchange).__name__}")
    if not isinstance(routing_key, str):
        raise ConfigurationError(
            f"routing_key must be a string, not {type(routing_key).__name__}"
        )
    for name, value in (("exchange", exchange), ("routing_key", routing_key)):
        if len(value.encode()) > 255:
            raise ConfigurationError(f"{name} is longer than AMQP's 255 bytes")
    if message_id is not None and not (isinstance(message_id, str) and message_id):
        raise ConfigurationError("message_id must be a non-empty string (or None for a new one)")
    seconds: float | None = None
    if delay is not None:
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else delay
        if not (isinstance(seconds, (int, float)) and seconds >= 0 and math.isfinite(seconds)):
            raise ConfigurationError(f"delay must be a number of seconds >= 0, not {delay!r}")
        seconds = float(seconds) or None  # no delay at all is a plain publish
    encoded, kind = encode_body(body, content_type)
    return Published(
        exchange,
        routing_key,
        encoded,
        dict(headers) if headers is not None else {},
        message_id or new_message_id(),
        kind,
        persistent=bool(persistent),
        delay=seconds,
    )


class BlockingPublisher:
    """:class:`Publisher` for sync code (Django or Flask views, scripts): the same
    ``publish``, blocking until the broker confirmed, safe to call from any thread.

    Use as ``with BlockingPublisher(settings) as publisher: publisher.publish(...)``; it runs
    its connection on an event loop in a thread of its own, stopped and joined on close.
    """

    def __init__(
        self,
        settings: Settings | str | None = None,
        *,
        timeout: float = 30.0,
        middleware: Sequence[Middleware] = (),
    ) -> None:
        self._publisher = Publisher(settings, timeout=timeout, middleware=middleware)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._owned = True
        self._lock = threading.Lock()

    @classmethod
    def over(cls, publisher: Publisher, loop: asyncio.AbstractEventLoop) -> BlockingPublisher:
        """``publisher`` (running on ``loop``) for code in other threads: a sync handler's."""
        blocking = cls.__new__(cls)
        blocking._publisher = publisher
        blocking._loop = loop
        blocking._stop = None
        blocking._thread = None
        blocking._owned = False
        blocking._lock = threading.Lock()
        return blocking

    def __enter__(self) -> BlockingPublisher:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> None:
        """Start the thread and connect; raises what the connection failed with."""
        with self._lock:
            if not self._owned or self._thread is not None:
                return
            started: concurrent.futures.Future[None] = concurrent.futures.Future()
            # A daemon thread, so a publisher nobody closed never keeps the interpreter
            # from exiting; close() stops and joins it.
            thread = threading.Thread(
                target=asyncio.run,
                args=(self._serve(started),),
                name="steadyrabbit-publisher",
                daemon=True,
            )
            thread.start()
            try:
                started.result()
            except BaseException:
                thread.join()
                raise
            self._thread = thread

    async def _serve(self, started: concurrent.futures.Future[None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self._publisher.open()
        except Exception as exc:  # noqa: BLE001 - raised in the thread that opens it
            started.set_exception(exc)
            return
        else:
            started.set_result(None)
        finally:
            if not started.done():  # cancelled while connecting: never leave open() waiting
                started.set_exception(ClosedByUserError("the publisher stopped while connecting"))
        try:
            await self._stop.wait()
        finally:
            await self._publisher.close()

    def close(self) -> None:
        """Finish the publishes under way, close the connection and join the thread."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None:
                return
            loop, stop = self._loop, self._stop
            self._loop = None
            if loop is not None and stop is not None:
                loop.call_soon_threadsafe(stop.set)
            thread.join()

    def publish(
        self,
        body: object,
        *,
        exchange: str = "",
        routing_key: str,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        content_type: str | None = None,
        persistent: bool = True,
        delay: float | timedelta | None = None,
    ) -> str:
        """:meth:`Publisher.publish`, blocking until the broker confirmed; any thread."""
        loop = self._loop
        if loop is None:
            raise ClosedByUserError(
                "the publisher is not open: use `with BlockingPublisher(...) as publisher`"
            )
        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is loop:
                raise ConfigurationError(
                    "a blocking publish on the event loop's own thread would wait for itself: "
                    "an async handler awaits message.publisher.publish(...) instead"
                )
        publishing = self._publisher.publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            headers=headers,
            message_id=message_id,
            content_type=content_type,
            persistent=persistent,
            delay=delay,
        )
        result: concurrent.futures.Future[str] = concurrent.futures.Future()

        def start() -> None:
            task = asyncio.ensure_future(publishing)
            task.add_done_callback(functools.partial(_settle_future, result))

        # The publish runs in this thread's context (a sync handler's tracing span, say),
        # which run_coroutine_threadsafe would not carry over.
        try:
            loop.call_soon_threadsafe(start, context=contextvars.copy_context())
        except RuntimeError:  # the loop is closed: its worker or publisher has stopped
            publishing.close()
            raise ClosedByUserError("the publisher's event loop has stopped") from None
        return result.result()


def _settle_future(result: concurrent.futures.Future[str], task: asyncio.Task[str]) -> None:
    if task.cancelled():
        result.cancel()
    elif (error := task.exception()) is not None:
        result.set_exception(error)
    else:
        result.set_result(task.result())
