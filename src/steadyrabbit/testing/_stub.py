"""Run a handler on one message without a broker, and get back what would become of it.

The handler runs as a worker would run it: the body decoded as the consumer asks, inside the
app's and the consumer's ``around_handler`` middleware, a sync handler in a thread; its error
(or none) goes through the same :func:`steadyrabbit.decide` the worker uses. Nothing is sent
anywhere: the :class:`~steadyrabbit.Decision` says what the worker would do (ack, retry after a
delay into which queue, dead-letter with which reason), and what the handler published through
``message.publisher`` (through the same ``around_publish`` middleware) is recorded, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .._amqp import synthetic_delivery
from .._app import App, HandlerSpec, call_sync
from .._decision import Decision, decide, retry_bucket_ms
from .._errors import ConfigurationError, HandlerExit, Reject
from .._message import Message
from .._middleware import Hooks
from .._outbound import Published
from .._properties import Properties
from .._publishing import BlockingPublisher, Publisher
from .._topology import copy_queue

__all__ = ["HandlerResult", "Published", "run_handler", "run_handler_sync"]


@dataclass(frozen=True)
class HandlerResult:
    """What a worker would do with the message (``decision``), and what the handler published
    (``published``, in order; each as the broker would have been handed it: the body encoded,
    a message id given, the headers as the middleware left them)."""

    decision: Decision
    published: tuple[Published, ...]


class _Recorder:
    """A transport that keeps what is published instead of sending it."""

    def __init__(self) -> None:
        self.published: list[Published] = []

    async def send(self, published: Published) -> None:
        self.published.append(published)

    def why_unconfirmed(self) -> str:
        return "the test stub confirms at once"  # never reached: send cannot wait


async def run_handler(
    app: App,
    queue: str,
    body: bytes,
    *,
    headers: Mapping[str, Any] | None = None,
    content_type: str | None = None,
    message_id: str | None = None,
    exchange: str = "",
    routing_key: str | None = None,
    redelivered: bool = False,
) -> HandlerResult:
    """Run the handler ``app`` registered for ``queue`` on a message with ``body``; return its
    :class:`~steadyrabbit.Decision` (with ``target`` set for a retry or a dead letter) and the
    messages it published.

    ``headers`` may carry ``x-steadyrabbit-attempts`` to stand for a retried message.
    """
    spec = _spec(app, queue)
    properties = Properties(
        headers=dict(headers) if headers is not None else {},
        content_type=content_type,
        message_id=message_id,
    )
    deliver, wire = synthetic_delivery(
        properties,
        delivery_tag=1,
        redelivered=redelivered,
        exchange=exchange,
        routing_key=routing_key if routing_key is not None else queue,
    )
    hooks = Hooks([*app.middleware, *spec.middleware])
    recorder = _Recorder()
    publisher = Publisher.over(recorder, hooks)
    publishers = (publisher, BlockingPublisher.over(publisher, asyncio.get_running_loop()))
    message = Message(None, deliver, wire, body, queue, publishers)  # type: ignore[arg-type]
    handler = hooks.wrap_handler(_handler_of(spec))
    error: Exception | None = None
    try:
        if spec.decode is not None:
            try:
                message.payload = spec.decode(body)
            except Reject:
                raise
            except Exception as exc:
                raise Reject(f"undecodable body: {type(exc).__name__}: {exc}") from exc
        await handler(message)
    except Exception as exc:  # noqa: BLE001 - any handler error is the message's outcome
        error = exc
    except SystemExit as exc:  # sys.exit() in an async handler fails its message, as in a worker
        error = HandlerExit(exc)
    decision = decide(error, properties.headers, spec.retry)
    if error is not None:
        target = copy_queue(spec.queue, spec.queue_type, retry_bucket_ms(decision, spec.retry))
        decision = replace(decision, target=target.name)
    return HandlerResult(decision, tuple(recorder.published))


def run_handler_sync(app: App, queue: str, body: bytes, **message: Any) -> HandlerResult:
    """:func:`run_handler` for tests without an event loop of their own."""
    return asyncio.run(run_handler(app, queue, body, **message))


def _spec(app: App, queue: str) -> HandlerSpec:
    for spec in app.handlers:
        if spec.queue == queue:
            return spec
    known = ", ".join(repr(spec.queue) for spec in app.handlers) or "none"
    raise ConfigurationError(f"the app has no handler for queue {queue!r} (it has {known})")


def _handler_of(spec: HandlerSpec) -> Any:
    threaded = spec.threaded
    if threaded is None:
        return spec.handler

    async def in_a_thread(message: Message) -> Any:
        # The worker's thread pool opens with the worker; a thread of its own does here.
        return await asyncio.to_thread(call_sync, threaded.fn, message)

    return in_a_thread
