"""Middleware: the one way to observe or wrap what a worker does.

Register with ``App(middleware=[...])`` (every consumer) or
``@app.consumer(..., middleware=[...])`` (one consumer; inside the app's). Every hook has a
no-op default: override only what you need. A worker calls only the hooks a middleware
overrides, so an app without middleware pays nothing for the mechanism.

The life of a worker, and when each hook runs::

    Worker.start()
        on_worker_start(worker)                  list order
    a connection opens          on_connected(role, address)
    it is lost                  on_reconnecting(role, cause, error)
    the broker closes a consuming channel        on_channel_lost(queue, error)
    the broker cancels a consumer                on_consumer_cancelled(queue)
    an async handler blocked the event loop      on_loop_blocked(culprit, seconds)
    each message:
        around_redelivery(message, call_next)    only a message the broker flagged
                                                 redelivered; first in the list outermost
        around_handler(message, call_next)       the first in the list is the outermost
            ... the handler ...
        (the handler's own publishes, and then the decision: ack, retry or dead letter; for
        a copy, publish it:)
        around_publish(publish, call_next)       first in the list outermost
        on_settled(message, decision)            reverse list order; after the ack, or after
                                                 the broker confirmed the copy and the original
                                                 was acked
    Worker.stop() / abort()
        on_worker_stop(worker)                   reverse list order

Before-hooks run in list order, after-hooks in reverse, so a middleware sees the message last
on the way out that saw it first on the way in (dramatiq's rule). App middleware wraps a
consumer's own.

``around_handler`` may end the message without running the handler by not calling
``call_next`` (it is then acked), or decide its outcome by raising :class:`Reject` or
:class:`Retry`. Any other exception it raises fails the message as the handler's would. Every
``around_redelivery`` wraps all of that (handler and settlement) for a redelivered message,
which is where a crash loop shows. ``await call_next(message)`` returns True if the handler ran
and finished, whatever became of its ack, and False if the run counted as a crash (an async
handler blocked the event loop and its connection died of it).
``await call_next(message, end_with=error)`` ends the message without running anything inside,
settled as ``error`` decides; it returns True once the message is settled. The built-in
crash-loop counting (:mod:`._crashguard`) is such a middleware. Like ``around_handler``, an
exception it raises fails the message as the handler's would, unless the message was settled
already (then it is logged and contained).

Every other hook is an observer: one that raises is logged and contained, and the message's
path never changes because of it. Whatever a middleware does, settlement keeps its rules: an
ack goes only to the channel that delivered the message, a copy is confirmed before the
original is acked, and nothing is requeued because something failed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ._errors import SteadyRabbitError

if TYPE_CHECKING:
    from ._decision import Decision
    from ._message import Message
    from ._url import BrokerAddress
    from ._view import WorkerView

log = logging.getLogger("steadyrabbit")

CallNext = Callable[["Message"], Awaitable[Any]]
PublishNext = Callable[["Publish"], Awaitable[None]]


class RedeliveryNext(Protocol):
    """The rest of the chain, as ``around_redelivery`` calls it (see the module docs)."""

    def __call__(
        self, message: Message, /, *, end_with: BaseException | None = None
    ) -> Awaitable[bool]: ...


@dataclass
class Publish:
    """A message about to be published, as ``around_publish`` sees it: one of steadyrabbit's
    copies (``copy``: a retry, a dead letter or a hand-off marker, to a queue of its own by the
    default exchange) or one a user publishes. ``headers`` may be changed (a tracing context,
    say) before ``call_next``."""

    exchange: str
    routing_key: str
    body: bytes
    headers: dict[str, Any]
    message_id: str | None = None
    copy: bool = False
    #: For a copy, the message it is a copy of.
    of: Message | None = None


class Middleware:
    """Base class of every middleware; see the module documentation for the lifecycle."""

    async def around_handler(self, message: Message, call_next: CallNext) -> Any:
        """Wrap the handler's run: ``await call_next(message)`` runs the rest of the chain."""
        return await call_next(message)

    async def around_redelivery(self, message: Message, call_next: RedeliveryNext) -> bool:
        """Wrap the handling of a redelivered message: ``await call_next(message)`` runs the
        rest; True if the handler finished, False if its run counted as a crash."""
        return await call_next(message)

    async def around_publish(self, publish: Publish, call_next: PublishNext) -> None:
        """Wrap a publish (a copy steadyrabbit makes, or a user's through a
        :class:`~steadyrabbit.Publisher` or ``message.publisher``): ``publish.headers`` may be
        changed before ``await call_next(publish)``; it returns once the broker confirmed."""
        await call_next(publish)

    def on_settled(self, message: Message, decision: Decision) -> None:
        """The message is settled as ``decision`` says (its outcome, reason, attempt, target)."""

    async def on_worker_start(self, worker: WorkerView) -> None:
        """The worker is about to connect; ``worker`` is read-only to middleware. Raising a
        :class:`SteadyRabbitError` (e.g. a port in use) refuses the start, with that error."""

    async def on_worker_stop(self, worker: WorkerView) -> None:
        """The worker has stopped consuming; its connections are closing."""

    def on_connected(self, role: str, address: BrokerAddress) -> None:
        """A connection (``consume`` or ``publish``) is open."""

    def on_reconnecting(self, role: str, cause: str, error: Exception) -> None:
        """A connection was lost (``cause``: ``missed_heartbeats``, ``connection_lost``, ...)."""

    def on_channel_lost(self, queue: str, error: Exception) -> None:
        """The broker closed the channel consuming ``queue`` (e.g. on ``consumer_timeout``)."""

    def on_consumer_cancelled(self, queue: str) -> None:
        """The broker cancelled the consumer of ``queue`` (queue deleted, or moved)."""

    def on_loop_blocked(self, culprit: str, seconds: float) -> None:
        """An async handler (named in ``culprit``) blocked the event loop for ``seconds``;
        called once the loop turns again."""


_OBSERVERS = (
    "on_settled",
    "on_worker_start",
    "on_worker_stop",
    "on_connected",
    "on_reconnecting",
    "on_channel_lost",
    "on_consumer_cancelled",
    "on_loop_blocked",
)
# After-hooks: called in reverse list order.
_AFTER = frozenset({"on_settled", "on_worker_stop"})


def overrides(middleware: Middleware, hook: str) -> bool:
    return getattr(type(middleware), hook) is not getattr(Middleware, hook)


class Hooks:
    """Dispatch tables: for each hook, only the middlewares that override it, in call order.

    Each observer method calls them one by one, logging and containing a failure. A table is a
    tuple: ``if hooks.settled:`` is the whole cost of an unused hook.
    """

    def __init__(self, middlewares: Sequence[Middleware] = ()) -> None:
        self.middlewares = tuple(middlewares)
        for hook in _OBSERVERS:
            table = tuple(m for m in self.middlewares if overrides(m, hook))
            setattr(self, f"_{hook}", table[::-1] if hook in _AFTER else table)
        self.around_handler = tuple(m for m in self.middlewares if overrides(m, "around_handler"))
        self.around_publish = tuple(m for m in self.middlewares if overrides(m, "around_publish"))
        self.around_redelivery = tuple(
            m for m in self.middlewares if overrides(m, "around_redelivery")
        )
        #: Truthy when some middleware wants each message's decision.
        self.settled: tuple[Middleware, ...] = self._on_settled
        #: Truthy when some middleware wants to hear of a blocked event loop.
        self.loop_blocked: tuple[Middleware, ...] = self._on_loop_blocked

    _on_settled: tuple[Middleware, ...]
    _on_worker_start: tuple[Middleware, ...]
    _on_worker_stop: tuple[Middleware, ...]
    _on_connected: tuple[Middleware, ...]
    _on_reconnecting: tuple[Middleware, ...]
    _on_channel_lost: tuple[Middleware, ...]
    _on_consumer_cancelled: tuple[Middleware, ...]
    _on_loop_blocked: tuple[Middleware, ...]

    def on_settled(self, message: Message, decision: Decision) -> None:
        _notify(self._on_settled, "on_settled", message, decision)

    async def on_worker_start(self, worker: WorkerView) -> None:
        for middleware in self._on_worker_start:
            try:
                await middleware.on_worker_start(worker)
            except SteadyRabbitError:
                raise  # a refusal to start, said in one sentence
            except Exception:
                log.exception(_FAILED, type(middleware).__qualname__, "on_worker_start")

    async def on_worker_stop(self, worker: WorkerView) -> None:
        for middleware in self._on_worker_stop:
            try:
                await middleware.on_worker_stop(worker)
            except Exception:
                log.exception(_FAILED, type(middleware).__qualname__, "on_worker_stop")

    def on_connected(self, role: str, address: BrokerAddress) -> None:
        _notify(self._on_connected, "on_connected", role, address)

    def on_reconnecting(self, role: str, cause: str, error: Exception) -> None:
        _notify(self._on_reconnecting, "on_reconnecting", role, cause, error)

    def on_channel_lost(self, queue: str, error: Exception) -> None:
        _notify(self._on_channel_lost, "on_channel_lost", queue, error)

    def on_consumer_cancelled(self, queue: str) -> None:
        _notify(self._on_consumer_cancelled, "on_consumer_cancelled", queue)

    def on_loop_blocked(self, culprit: str, seconds: float) -> None:
        _notify(self._on_loop_blocked, "on_loop_blocked", culprit, seconds)

    def wrap_handler(self, handler: CallNext) -> CallNext:
        """``handler`` inside every ``around_handler``, the first middleware outermost; the
        handler itself when none wraps it (built once per consumer, not per message)."""
        for middleware in reversed(self.around_handler):
            handler = _bind(middleware.around_handler, handler)
        return handler

    def wrap_redelivery(self, settle: RedeliveryNext) -> RedeliveryNext:
        """``settle`` (run the handler and settle, or settle as ``end_with`` decides) inside
        every ``around_redelivery``, the first middleware outermost. ``end_with`` skips the
        middlewares further in: like a short-circuit of ``around_handler``, they never see
        the message."""
        chain = settle
        for middleware in reversed(self.around_redelivery):
            chain = _bind_redelivery(middleware.around_redelivery, chain, settle)
        return chain

    def wrap_publish(self, publish: PublishNext) -> PublishNext:
        for middleware in reversed(self.around_publish):
            publish = _bind(middleware.around_publish, publish)
        return publish


def _bind(around: Callable[[Any, Any], Awaitable[Any]], inner: Any) -> Any:
    # A plain function that returns the middleware's coroutine: no coroutine of its own, so a
    # layer of middleware costs one frame per message, not two.
    def call(item: Any) -> Awaitable[Any]:
        return around(item, inner)

    return call


def _bind_redelivery(
    around: Callable[[Message, RedeliveryNext], Awaitable[bool]],
    inner: RedeliveryNext,
    settle: RedeliveryNext,
) -> RedeliveryNext:
    async def call(message: Message, /, *, end_with: BaseException | None = None) -> bool:
        if end_with is not None:
            return await settle(message, end_with=end_with)
        return await around(message, inner)

    return call


def _notify(table: tuple[Middleware, ...], hook: str, *args: Any) -> None:
    for middleware in table:
        try:
            getattr(middleware, hook)(*args)
        except Exception:
            log.exception(_FAILED, type(middleware).__qualname__, hook)


_FAILED = "middleware %s failed in %s (ignored)"
