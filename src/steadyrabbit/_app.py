"""The app: which handler consumes which queue, and how."""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Future
from contextvars import Context, copy_context
from dataclasses import dataclass, replace
from queue import Empty, SimpleQueue
from typing import Any, TypeVar

from ._errors import ConfigurationError, HandlerExit
from ._message import Message
from ._middleware import Middleware
from ._payload import typed_handler
from ._retry import RetryPolicy
from ._topology import dead_letter_queue_name

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

    The pool is opened when a worker starts and closed when it stops, so an app can be run
    more than once (tests, embedding).
    """

    def __init__(self, fn: SyncHandler, threads: int, queue: str) -> None:
        self.fn = fn
        self._threads = threads
        self._queue = queue
        self._pool: _HandlerThreads | None = None

    def open(self) -> None:
        self._pool = _HandlerThreads(self.fn, self._threads, f"steadyrabbit[{self._queue}]")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __call__(self, message: Message) -> Awaitable[Any]:
        if self._pool is None:
            raise RuntimeError(f"the handler threads of {self._queue!r} are not open")
        loop = asyncio.get_running_loop()
        return asyncio.wrap_future(self._pool.submit(message), loop=loop)


class _HandlerThreads:
    """Up to ``size`` daemon threads that run ``fn``, started as needed and then reused.

    Not a ThreadPoolExecutor: the interpreter joins an executor's threads at exit, so a handler
    stuck forever would keep the process alive after a fatal error or a forced stop. A daemon
    thread is left behind instead; its message, never acked, is redelivered by the broker.
    """

    def __init__(self, fn: SyncHandler, size: int, name: str) -> None:
        self._fn = fn
        self._size = size
        self._name = name
        self._jobs: SimpleQueue[tuple[Future[Any], Message, Context] | None] = SimpleQueue()
        self._idle = threading.Semaphore(0)  # released by a thread each time it waits for work
        self._started = 0
        self._closed = False

    def submit(self, message: Message) -> Future[Any]:
        if self._closed:
            raise RuntimeError(f"{self._name}: the handler threads are closed")
        future: Future[Any] = Future()
        # The handler runs in the submitter's context: what middleware set there (a tracing
        # span, say) is the handler's too, as for an async handler's task.
        self._jobs.put((future, message, copy_context()))
        if not self._idle.acquire(blocking=False) and self._started < self._size:
            thread = threading.Thread(
                target=self._work, name=f"{self._name}_{self._started}", daemon=True
            )
            thread.start()
            self._started += 1
        return future

    def close(self) -> None:
        """Cancel what has not started; each thread ends once it is done with its message."""
        self._closed = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except Empty:
                break
            if job is not None:
                job[0].cancel()
        for _ in range(self._started):
            self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._run(*job)
            del job  # holds no message while idle
            self._idle.release()

    def _run(self, future: Future[Any], message: Message, context: Context) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = context.run(call_sync, self._fn, message)
        except Exception as exc:  # noqa: BLE001 - the handler's failure, for its message
            future.set_exception(exc)
        else:
            future.set_result(result)


def call_sync(fn: SyncHandler, message: Message) -> Any:
    """``fn(message)``, with SystemExit, KeyboardInterrupt and the like raised by the handler
    turned into a :class:`HandlerExit`, a failure of the message like any other.

    In a handler thread none of them is ever a real Ctrl-C or exit: signals reach only the main
    thread, and a thread's SystemExit would not end the process anyway.
    """
    try:
        return fn(message)
    except BaseException as exc:
        if isinstance(exc, Exception):
            raise
        raise HandlerExit(exc) from exc


_EXCHANGE_TYPES = frozenset({"topic", "direct", "fanout", "headers"})

#: The concurrency of an async handler that sets none. A task per message costs little and most
#: async handlers wait on I/O; measured with a no-op handler (W1, adaptive prefetch), 1 ran at
#: 0.5x raw pika's defaults, 4 at 1.0x and 16 at 1.4x: 16 is where one event loop is kept busy
#: without many messages in flight. A sync handler keeps 1 thread: blocking code is often not
#: thread-safe, so more threads are the user's choice.
ASYNC_DEFAULT_CONCURRENCY = 16


def _kind_default(fn: Callable[..., Any]) -> int:
    return ASYNC_DEFAULT_CONCURRENCY if inspect.iscoroutinefunction(fn) else 1


@dataclass(frozen=True)
class ExchangeBinding:
    """``source`` routes on to ``destination`` (see :meth:`App.bind_exchange`)."""

    source: str
    destination: str
    routing_keys: tuple[str, ...]
    arguments: Mapping[str, Any] | None
    source_type: str
    destination_type: str


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
    routing_keys: tuple[str, ...]
    bind_arguments: Mapping[str, Any] | None
    decode: Decoder | None
    retry: RetryPolicy
    queue_type: str
    #: As registered; None where the consumer left it to the defaults (App.apply_defaults).
    own_concurrency: int | None = None
    own_prefetch: int | None = None
    #: This consumer's own middleware (inside the app's); see :mod:`._middleware`.
    middleware: tuple[Middleware, ...] = ()
    #: The idempotency key of a message (None: not deduplicated); None here: the default,
    #: ``message_id`` with a digest of the body (see :mod:`._idempotency`).
    idempotency_key: Callable[[Message], str | None] | None = None
    #: The handler's time budget in seconds: on RabbitMQ 3.12 and later, the consumer's
    #: ``x-consumer-timeout``; None: the broker's ``consumer_timeout``, with hand-offs.
    max_duration: float | None = None
    #: Only one consumer of the queue at a time gets its messages (the queue argument
    #: ``x-single-active-consumer``); the others wait as hot standbys.
    #: True when neither the consumer nor a default gave a prefetch: the window then follows
    #: the measured handler durations (see :mod:`._window`); ``prefetch`` is where it starts.
    adaptive_prefetch: bool = False
    single_active: bool = False
    #: This consumer's ``x-priority``: the broker delivers to the highest-priority consumers
    #: with room for more before the others. None: the broker's default (0).
    priority: int | None = None

    @property
    def name(self) -> str:
        fn = self.function
        return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"

    @property
    def dead_letter_queue(self) -> str:
        return dead_letter_queue_name(self.queue)

    @property
    def threaded(self) -> _ThreadedHandler | None:
        return self.handler if isinstance(self.handler, _ThreadedHandler) else None


class App:
    """A set of handlers. It holds no connection: run it with :func:`run` or a :class:`Worker`.

    >>> app = App()
    >>> @app.consumer("orders", exchange="events", routing_key="order.*", concurrency=4)
    ... def handle(message: Message) -> None: ...
    """

    def __init__(
        self,
        *,
        retry: RetryPolicy | None = None,
        queue_type: str = "classic",
        middleware: Sequence[Middleware] = (),
    ) -> None:
        """``retry`` and ``queue_type`` are defaults for every handler registered later.
        ``middleware`` wraps and observes every consumer (see :class:`Middleware`)."""
        _check_queue_type(queue_type)
        self.retry = retry or RetryPolicy()
        self.queue_type = queue_type
        self.middleware = _middleware_list(middleware)
        self._specs: list[HandlerSpec] = []
        self._exchange_bindings: list[ExchangeBinding] = []
        self._shutdown_hooks: list[Hook] = []
        self._window_defaults: tuple[int | None, int | None] = (None, None)

    @property
    def handlers(self) -> tuple[HandlerSpec, ...]:
        return tuple(self._specs)

    @property
    def shutdown_hooks(self) -> tuple[Hook, ...]:
        return tuple(self._shutdown_hooks)

    @property
    def exchange_bindings(self) -> tuple[ExchangeBinding, ...]:
        return tuple(self._exchange_bindings)

    def bind_exchange(
        self,
        source: str,
        destination: str,
        *,
        routing_key: str | Sequence[str] | None = None,
        bind_arguments: Mapping[str, Any] | None = None,
        source_type: str = "topic",
        destination_type: str = "topic",
    ) -> ExchangeBinding:
        """Route what ``source`` routes (by ``routing_key``, one or a list, or
        ``bind_arguments`` for a headers exchange) on to the exchange ``destination``. Both
        are declared durable (of their types) if missing, and the binding is declared with
        every consumer's topology: at start and again after each reconnect."""
        for name in (source, destination):
            if not isinstance(name, str) or not name or len(name.encode()) > 255:
                raise ConfigurationError(
                    "an exchange binding joins two named exchanges (1 to 255 bytes; the "
                    "default exchange cannot be bound)"
                )
        if source == destination:
            raise ConfigurationError(f"exchange {source!r} cannot be bound to itself")
        for kind in (source_type, destination_type):
            if kind not in _EXCHANGE_TYPES:
                raise ConfigurationError(f"unknown exchange type {kind!r}")
        what = f"the binding of exchange {destination!r} to {source!r}"
        keys = _routing_keys(what, source, source_type, routing_key, bind_arguments)
        binding = ExchangeBinding(
            source,
            destination,
            keys,
            None if bind_arguments is None else dict(bind_arguments),
            source_type,
            destination_type,
        )
        self._exchange_bindings.append(binding)
        return binding

    def consumer(
        self,
        queue: str,
        *,
        concurrency: int | None = None,
        prefetch: int | None = None,
        exchange: str | None = None,
        exchange_type: str = "topic",
        routing_key: str | Sequence[str] | None = None,
        bind_arguments: Mapping[str, Any] | None = None,
        decode: str | Decoder | None = None,
        retry: RetryPolicy | None = None,
        queue_type: str | None = None,
        middleware: Sequence[Middleware] = (),
        idempotency_key: Callable[[Message], str | None] | None = None,
        max_duration: float | None = None,
        single_active: bool = False,
        priority: int | None = None,
    ) -> Callable[[H], H]:
        """Register the decorated function (sync or ``async def``) as the handler of ``queue``.

        ``concurrency`` handlers run at once (threads for a sync function, tasks for an async
        one). Without ``prefetch``, the window the broker may send ahead follows the measured
        handler durations: it starts at ``concurrency`` and lets as many messages wait as can
        start within a second (at most 5 % of ``consumer_timeout``), up to 1,000, so a fast
        handler is fed in bulk and a slow one has nothing waiting (see :mod:`._window`). A
        ``prefetch`` of its own is used as it is and can never be unlimited. Left out
        (None), they take the defaults of :meth:`apply_defaults` (``steadyrabbit run
        --concurrency/--prefetch``, from the flags, the environment or the config file), else
        a concurrency of 16 for an async handler and 1 for a sync one, and the adaptive
        prefetch.
        With ``exchange`` the queue is bound to that exchange (declared durable, of
        ``exchange_type``, if missing): once per ``routing_key`` (one or a list) for a topic or
        direct exchange; once, with no key, for a fanout exchange; with ``bind_arguments``
        (``{"x-match": "all", "type": "order"}``) for a headers exchange.
        ``decode`` ("json", "text" or a callable) turns the body into ``message.payload``; a
        body that fails to decode is dead-lettered. A handler whose first parameter is
        annotated with a pydantic model, a dataclass or a ``TypedDict`` receives the body
        validated as that (JSON, or what ``decode`` made of it), and the message as its second
        parameter if it has one; a body that does not validate is dead-lettered at once, the
        errors by field path as the reason.
        ``retry`` (default: the app's) decides how failures are retried; ``queue_type``
        ("classic" or "quorum", default: the app's) is the type of the retry and dead-letter
        queues, and of the consumed queue if it has to be created. ``middleware``: this
        consumer's own, inside the app's.
        ``idempotency_key(message)``: the key under which a message runs at most once to
        completion (None for a message not to deduplicate); by default its ``message_id`` with
        a digest of its body. ``max_duration``: the handler's time budget in seconds; on
        RabbitMQ 3.12 and later it becomes this consumer's ``x-consumer-timeout``, and
        elsewhere a run near the broker's ``consumer_timeout`` is handed off (see the README).
        ``single_active``: one consumer of the queue at a time gets its messages, the others
        (other workers) standing by; set on the queue when steadyrabbit creates it, and checked
        on a queue that exists (a queue's arguments cannot change). ``priority``: this
        consumer's ``x-priority`` (higher first, while it has room).
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
                bind_arguments=bind_arguments,
                decode=decode,
                retry=retry,
                queue_type=queue_type,
                middleware=middleware,
                idempotency_key=idempotency_key,
                max_duration=max_duration,
                single_active=single_active,
                priority=priority,
            )
            return fn

        return register

    def add_consumer(
        self,
        fn: Callable[[Message], Any],
        queue: str,
        *,
        concurrency: int | None = None,
        prefetch: int | None = None,
        exchange: str | None = None,
        exchange_type: str = "topic",
        routing_key: str | Sequence[str] | None = None,
        bind_arguments: Mapping[str, Any] | None = None,
        decode: str | Decoder | None = None,
        retry: RetryPolicy | None = None,
        queue_type: str | None = None,
        middleware: Sequence[Middleware] = (),
        idempotency_key: Callable[[Message], str | None] | None = None,
        max_duration: float | None = None,
        single_active: bool = False,
        priority: int | None = None,
    ) -> HandlerSpec:
        """Register ``fn`` as the handler of ``queue``; see :meth:`consumer`."""
        if not queue or len(queue.encode()) > 250:
            raise ConfigurationError("a queue name must be 1 to 250 bytes long")
        if any(spec.queue == queue for spec in self._specs):
            raise ConfigurationError(f"queue {queue!r} already has a handler")
        own_concurrency, own_prefetch = concurrency, prefetch
        concurrency, prefetch = _window(
            queue,
            concurrency,
            prefetch,
            *self._window_defaults,
            kind_default=_kind_default(fn),
        )
        if exchange == "":
            raise ConfigurationError("the default exchange cannot be bound; omit the exchange")
        if exchange_type not in _EXCHANGE_TYPES:
            raise ConfigurationError(f"unknown exchange type {exchange_type!r}")
        routing_keys = _routing_keys(
            f"queue {queue!r}", exchange, exchange_type, routing_key, bind_arguments
        )
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
        if idempotency_key is not None and not callable(idempotency_key):
            raise ConfigurationError(f"idempotency_key for {queue!r} must be a function")
        if max_duration is not None and (
            isinstance(max_duration, bool)
            or not isinstance(max_duration, int | float)
            or not 0 < max_duration < 2**31 / 1000
        ):
            raise ConfigurationError(
                f"max_duration for {queue!r} must be a number of seconds > 0, "
                f"not {max_duration!r}"
            )
        # A first parameter annotated with a model (not Message) takes the validated payload.
        typed = typed_handler(fn)
        call: Callable[[Message], Any] = fn
        if typed is not None:
            decode = typed.validator(decode)
            call = typed.call
        if not isinstance(single_active, bool):
            raise ConfigurationError(f"single_active for {queue!r} must be True or False")
        if priority is not None and (
            isinstance(priority, bool)
            or not isinstance(priority, int)
            or not -(2**31) <= priority < 2**31
        ):
            raise ConfigurationError(
                f"priority for {queue!r} must be a whole number (higher goes first), "
                f"not {priority!r}"
            )
        handler: AsyncHandler
        if inspect.iscoroutinefunction(fn):
            handler = call  # a SystemExit it raises is caught where it is awaited
        else:
            handler = _ThreadedHandler(call, concurrency, queue)
        spec = HandlerSpec(
            queue=queue,
            handler=handler,
            function=fn,
            concurrency=concurrency,
            prefetch=prefetch,
            exchange=exchange,
            exchange_type=exchange_type,
            routing_keys=routing_keys,
            bind_arguments=None if bind_arguments is None else dict(bind_arguments),
            decode=decode,
            retry=retry or self.retry,
            queue_type=queue_type or self.queue_type,
            own_concurrency=own_concurrency,
            own_prefetch=own_prefetch,
            middleware=_middleware_list(middleware),
            idempotency_key=idempotency_key,
            max_duration=None if max_duration is None else float(max_duration),
            single_active=single_active,
            priority=priority,
            adaptive_prefetch=own_prefetch is None and self._window_defaults[1] is None,
        )
        self._specs.append(spec)
        return spec

    def apply_defaults(
        self, *, concurrency: int | None = None, prefetch: int | None = None
    ) -> None:
        """Make ``concurrency`` and ``prefetch`` the defaults of every consumer registered
        (before or after) without a value of its own; None: no default (1, and prefetch =
        concurrency). ``steadyrabbit run`` calls this with its ``--concurrency`` and
        ``--prefetch`` (or their variables or config-file keys) before it starts the worker.

        Raises :class:`ConfigurationError` (and changes nothing) when a default does not fit a
        consumer: a default prefetch below a consumer's own concurrency, say.
        """
        specs = []
        for spec in self._specs:
            threads, window = _window(
                spec.queue,
                spec.own_concurrency,
                spec.own_prefetch,
                concurrency,
                prefetch,
                kind_default=_kind_default(spec.function),
            )
            handler = spec.handler
            if spec.threaded is not None and threads != spec.concurrency:
                handler = _ThreadedHandler(spec.threaded.fn, threads, spec.queue)
            adaptive = spec.own_prefetch is None and prefetch is None
            specs.append(
                replace(
                    spec,
                    handler=handler,
                    concurrency=threads,
                    prefetch=window,
                    adaptive_prefetch=adaptive,
                )
            )
        self._specs[:] = specs
        self._window_defaults = (concurrency, prefetch)

    def on_shutdown(self, hook: Hook) -> Hook:
        """Run ``await hook()`` after the last handler finished, before the connection closes."""
        self._shutdown_hooks.append(hook)
        return hook


def _routing_keys(
    subject: str,
    exchange: str | None,
    exchange_type: str,
    routing_key: object,
    bind_arguments: Mapping[str, Any] | None,
) -> tuple[str, ...]:
    """The routing keys of ``subject``'s binding (``queue 'q'``), checked: one sentence for
    any misuse."""
    if exchange is None:
        if routing_key is not None or bind_arguments is not None:
            raise ConfigurationError(
                f"{subject}: a routing key or bind arguments need an exchange to bind to"
            )
        return ()
    if isinstance(routing_key, str):
        keys: tuple[str, ...] = (routing_key,)
    elif routing_key is None:
        keys = ()
    elif isinstance(routing_key, list | tuple) and all(isinstance(k, str) for k in routing_key):
        keys = tuple(dict.fromkeys(routing_key))  # each binding once, in the order given
    else:
        raise ConfigurationError(
            f"{subject}: routing_key must be a string or a list of strings, "
            f"not {type(routing_key).__name__}"
        )
    if any(len(key.encode()) > 255 for key in keys):
        raise ConfigurationError(f"{subject}: a routing key is at most 255 bytes long")
    if bind_arguments is not None and not isinstance(bind_arguments, Mapping):
        raise ConfigurationError(f"{subject}: bind_arguments must be a mapping")
    if exchange_type in {"topic", "direct"}:
        if not keys:
            raise ConfigurationError(
                f"{subject}: binding to the {exchange_type} exchange {exchange!r} "
                "needs a routing key (one or a list)"
            )
        return keys
    if keys:
        # The broker would accept and ignore them: say so instead of binding what never matches.
        raise ConfigurationError(
            f"{subject}: a {exchange_type} exchange ignores routing keys; "
            + (
                "omit routing_key"
                if exchange_type == "fanout"
                else "match on headers with bind_arguments={'x-match': 'all', ...}"
            )
        )
    if exchange_type == "headers" and not bind_arguments:
        raise ConfigurationError(
            f"{subject}: binding to the headers exchange {exchange!r} needs "
            "bind_arguments, e.g. {'x-match': 'all', 'type': 'order'}"
        )
    return ("",)


def _window(
    queue: str,
    concurrency: int | None,
    prefetch: int | None,
    default_concurrency: int | None,
    default_prefetch: int | None,
    *,
    kind_default: int = 1,
) -> tuple[int, int]:
    """The concurrency and prefetch of the consumer of ``queue`` registered with these (None:
    not given), with these defaults (None: none; then ``kind_default``, by the handler's kind);
    checked, in one sentence."""
    if concurrency is None and default_concurrency is not None:
        concurrency = default_concurrency
        if not 1 <= concurrency <= _MAX_WINDOW:
            raise ConfigurationError(f"the default concurrency must be between 1 and {_MAX_WINDOW}")
        if prefetch is not None and prefetch < concurrency:
            raise ConfigurationError(
                f"queue {queue!r}: the default concurrency is above its own prefetch "
                f"({prefetch}); give that consumer a concurrency of its own, or lower the default"
            )
    concurrency = kind_default if concurrency is None else concurrency
    if not 1 <= concurrency <= _MAX_WINDOW:
        raise ConfigurationError(f"concurrency must be between 1 and {_MAX_WINDOW}")
    if prefetch is None and default_prefetch is not None:
        prefetch = default_prefetch
        if prefetch == 0 or prefetch > _MAX_WINDOW:
            raise ConfigurationError(f"the default prefetch must be between 1 and {_MAX_WINDOW}")
        if prefetch < concurrency:
            raise ConfigurationError(
                f"queue {queue!r}: the default prefetch is below its concurrency ({concurrency}); "
                "give that consumer a prefetch of its own, or raise the default"
            )
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
    return concurrency, prefetch


def _middleware_list(middleware: Sequence[Middleware]) -> tuple[Middleware, ...]:
    found = tuple(middleware)
    for item in found:
        if not isinstance(item, Middleware):
            raise ConfigurationError(
                f"middleware must be instances of steadyrabbit.Middleware, not {item!r}"
            )
    return found


def _check_queue_type(queue_type: str) -> None:
    if queue_type not in {"classic", "quorum"}:
        raise ConfigurationError(f"queue type must be 'classic' or 'quorum', not {queue_type!r}")
