"""The app: which handler consumes which queue, and how."""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from ._errors import ConfigurationError
from ._message import Message
from ._retry import RetryPolicy

AsyncHandler = Callable[[Message], Awaitable[Any]]
SyncHandler = Callable[[Message], Any]
Decoder = Callable[[bytes], Any]
Hook = Callable[[], Awaitable[None]]
H = TypeVar("H", bound=Callable[..., Any])

_MAX_WINDOW = 65535
_DECODERS: dict[str, Decoder] = {
    "json": json.loads,
    "text": functools.partial(bytes.decode, encoding="utf-8"),
}


class _ThreadedHandler:
    """A sync handler, made awaitable once at registration: it runs in a bounded thread pool.

    The pool is created when a worker starts and shut down when it stops, so an app can be run
    more than once (tests, embedding).
    """

    def __init__(self, fn: SyncHandler, threads: int, queue: str) -> None:
        self.fn = fn
        self._threads = threads
        self._queue = queue
        self._executor: ThreadPoolExecutor | None = None

    def open(self) -> None:
        self._executor = ThreadPoolExecutor(
            self._threads, thread_name_prefix=f"steadyrabbit[{self._queue}]"
        )

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def __call__(self, message: Message) -> Awaitable[Any]:
        return asyncio.get_running_loop().run_in_executor(self._executor, self.fn, message)


@dataclass(frozen=True)
class HandlerSpec:
    """A registered handler and everything about the queue it consumes."""

    queue: str
    handler: AsyncHandler
    function: Callable[..., Any]
    concurrency: int
    prefetch: int
    exchange: str | None
    exchange_type: str
    routing_key: str | None
    decode: Decoder | None
    retry: RetryPolicy
    queue_type: str

    @property
    def name(self) -> str:
        fn = self.function
        return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.queue}.dlq"

    @property
    def threaded(self) -> _ThreadedHandler | None:
        return self.handler if isinstance(self.handler, _ThreadedHandler) else None


class App:
    """A set of handlers. It holds no connection: run it with :func:`run` or a :class:`Worker`.

    >>> app = App()
    >>> @app.consumer("orders", exchange="events", routing_key="order.*", concurrency=4)
    ... def handle(message: Message) -> None: ...
    """

    def __init__(self, *, retry: RetryPolicy | None = None, queue_type: str = "classic") -> None:
        """``retry`` and ``queue_type`` are defaults for every handler registered later."""
        _check_queue_type(queue_type)
        self.retry = retry or RetryPolicy()
        self.queue_type = queue_type
        self._specs: list[HandlerSpec] = []
        self._shutdown_hooks: list[Hook] = []

    @property
    def handlers(self) -> tuple[HandlerSpec, ...]:
        return tuple(self._specs)

    @property
    def shutdown_hooks(self) -> tuple[Hook, ...]:
        return tuple(self._shutdown_hooks)

    def consumer(
        self,
        queue: str,
        *,
        concurrency: int = 1,
        prefetch: int | None = None,
        exchange: str | None = None,
        exchange_type: str = "topic",
        routing_key: str | None = None,
        decode: str | Decoder | None = None,
        retry: RetryPolicy | None = None,
        queue_type: str | None = None,
    ) -> Callable[[H], H]:
        """Register the decorated function (sync or ``async def``) as the handler of ``queue``.

        ``concurrency`` handlers run at once (threads for a sync function, tasks for an async
        one). ``prefetch`` defaults to ``concurrency`` so no message waits unstarted in this
        process; a larger value is an explicit choice and can never be unlimited.
        With ``exchange`` and ``routing_key`` the queue is bound to that exchange (declared
        durable, of ``exchange_type``, if missing). ``decode`` ("json", "text" or a callable)
        turns the body into ``message.payload``; a body that fails to decode is dead-lettered.
        ``retry`` (default: the app's) decides how failures are retried; ``queue_type``
        ("classic" or "quorum", default: the app's) is the type of the retry and dead-letter
        queues, and of the consumed queue if it has to be created.
        """

        def register(fn: H) -> H:
            self.add_consumer(
                fn,
                queue,
                concurrency=concurrency,
                prefetch=prefetch,
                exchange=exchange,
                exchange_type=exchange_type,
                routing_key=routing_key,
                decode=decode,
                retry=retry,
                queue_type=queue_type,
            )
            return fn

        return register

    def add_consumer(
        self,
        fn: Callable[[Message], Any],
        queue: str,
        *,
        concurrency: int = 1,
        prefetch: int | None = None,
        exchange: str | None = None,
        exchange_type: str = "topic",
        routing_key: str | None = None,
        decode: str | Decoder | None = None,
        retry: RetryPolicy | None = None,
        queue_type: str | None = None,
    ) -> HandlerSpec:
        """Register ``fn`` as the handler of ``queue``; see :meth:`consumer`."""
        if not queue or len(queue.encode()) > 250:
            raise ConfigurationError("a queue name must be 1 to 250 bytes long")
        if any(spec.queue == queue for spec in self._specs):
            raise ConfigurationError(f"queue {queue!r} already has a handler")
        if not 1 <= concurrency <= _MAX_WINDOW:
            raise ConfigurationError(f"concurrency must be between 1 and {_MAX_WINDOW}")
        if prefetch is None:
            prefetch = concurrency
        if prefetch == 0:
            raise ConfigurationError(
                "prefetch 0 means unlimited, which steadyrabbit never allows: "
                "the broker would push the whole backlog into one slow consumer"
            )
        if not concurrency <= prefetch <= _MAX_WINDOW:
            raise ConfigurationError(
                f"prefetch must be between the concurrency ({concurrency}) and {_MAX_WINDOW}"
            )
        if (exchange is None) != (routing_key is None):
            raise ConfigurationError("give both an exchange and a routing key, or neither")
        if exchange == "":
            raise ConfigurationError("the default exchange cannot be bound; omit the exchange")
        if exchange_type not in {"topic", "direct", "fanout", "headers"}:
            raise ConfigurationError(f"unknown exchange type {exchange_type!r}")
        if isinstance(decode, str):
            if decode not in _DECODERS:
                raise ConfigurationError(
                    f"unknown decoder {decode!r}; use one of {sorted(_DECODERS)} or a callable"
                )
            decode = _DECODERS[decode]
        if not callable(fn):
            raise ConfigurationError(f"handler for {queue!r} is not callable")
        if queue_type is not None:
            _check_queue_type(queue_type)
        handler: AsyncHandler
        if inspect.iscoroutinefunction(fn):
            handler = fn
        else:
            handler = _ThreadedHandler(fn, concurrency, queue)
        spec = HandlerSpec(
            queue=queue,
            handler=handler,
            function=fn,
            concurrency=concurrency,
            prefetch=prefetch,
            exchange=exchange,
            exchange_type=exchange_type,
            routing_key=routing_key,
            decode=decode,
            retry=retry or self.retry,
            queue_type=queue_type or self.queue_type,
        )
        self._specs.append(spec)
        return spec

    def on_shutdown(self, hook: Hook) -> Hook:
        """Run ``await hook()`` after the last handler finished, before the connection closes."""
        self._shutdown_hooks.append(hook)
        return hook


def _check_queue_type(queue_type: str) -> None:
    if queue_type not in {"classic", "quorum"}:
        raise ConfigurationError(f"queue type must be 'classic' or 'quorum', not {queue_type!r}")
