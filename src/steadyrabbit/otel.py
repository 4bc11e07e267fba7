"""OpenTelemetry tracing, as middleware: ``App(middleware=[Tracing()])`` and
``Publisher(settings, middleware=[Tracing()])``. Needs ``steadyrabbit[otel]`` (the API; bring
your SDK and exporter). Nothing imports this module unless you do, so without it tracing costs
nothing.

Spans, after OpenTelemetry's messaging semantic conventions (``messaging.system`` is
``rabbitmq``)::

    publish <exchange>       PRODUCER  a publish through a Publisher or message.publisher; its
                                       context goes into the message's ``traceparent`` header
    process <queue>          CONSUMER  one delivery, from the handler's start to the message's
                                       settlement; its parent is the message's ``traceparent``;
                                       ``steadyrabbit.outcome`` (ack, retry, dead_letter) and
                                       ``steadyrabbit.attempt`` say what became of it
    publish <copy queue>     PRODUCER  a retry or dead-letter copy, a child of the delivery it
                                       is a copy of; the copy carries its context

So one trace holds a message's whole life: published, failed twice (each retry a child of the
failed attempt), dead-lettered, replayed by ``steadyrabbit dlq replay`` (which keeps the
headers) and consumed. The handler runs in its delivery's context, a sync handler's thread
included, so spans it makes (an HTTP client's, say) and messages it publishes are children.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter, TextMapPropagator
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider

from ._decision import Decision, Outcome
from ._message import Message
from ._middleware import CallNext, Middleware, Publish, PublishNext
from ._view import WorkerView

__all__ = ["Tracing"]

_SYSTEM = {"messaging.system": "rabbitmq"}


class _HeaderGetter(Getter[Mapping[str, Any]]):
    """Reads AMQP headers, whose values may arrive as bytes."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            return None
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        return [str(value)]

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return list(carrier)


_GETTER = _HeaderGetter()


class Tracing(Middleware):
    """Traces every delivery and every publish (see the module documentation).

    ``tracer_provider``: where spans go (default: the global one). ``propagator``: how a
    context travels in headers (default: the global one, W3C ``traceparent`` unless changed).
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        self._tracer = trace.get_tracer("steadyrabbit", tracer_provider=tracer_provider)
        self._propagator = propagator
        # Each delivery's span, from its handler's start until it is settled.
        self._open: dict[Message, Span] = {}

    @property
    def _propagation(self) -> TextMapPropagator:
        return self._propagator or propagate.get_global_textmap()

    async def around_handler(self, message: Message, call_next: CallNext) -> Any:
        self._end_abandoned()
        parent = self._propagation.extract(message.headers, getter=_GETTER)
        span = self._tracer.start_span(
            f"process {message.queue}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                **_SYSTEM,
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": message.exchange or "amq.default",
                "messaging.destination.subscription.name": message.queue,
                "messaging.rabbitmq.destination.routing_key": message.routing_key,
                "messaging.message.id": message.message_id or "",
                "messaging.message.body.size": len(message.body),
                "steadyrabbit.attempt": message.attempt,
                "steadyrabbit.redelivered": message.redelivered,
            },
        )
        self._open[message] = span
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        try:
            return await call_next(message)
        except Exception as exc:
            span.record_exception(exc)
            raise
        finally:
            otel_context.detach(token)

    def on_settled(self, message: Message, decision: Decision) -> None:
        span = self._open.pop(message, None)
        if span is None:
            return
        span.set_attribute("steadyrabbit.outcome", decision.outcome.value)
        span.set_attribute("steadyrabbit.attempt", decision.attempt)
        if decision.target is not None:
            span.set_attribute("steadyrabbit.target", decision.target)
        if decision.outcome is not Outcome.ACK:
            if decision.error_type is not None:
                span.set_attribute("error.type", decision.error_type)
            span.set_status(Status(StatusCode.ERROR, decision.reason))
        span.end()

    async def around_publish(self, publish: Publish, call_next: PublishNext) -> None:
        if publish.copy:
            name = f"publish {publish.routing_key}"
            delivery = self._open.get(publish.of) if publish.of is not None else None
            parent = trace.set_span_in_context(delivery) if delivery is not None else None
        else:
            name = f"publish {publish.exchange or 'amq.default'}"
            parent = None  # the current context: a handler's delivery, or the caller's
        with self._tracer.start_as_current_span(
            name,
            context=parent,
            kind=SpanKind.PRODUCER,
            attributes={
                **_SYSTEM,
                "messaging.operation.type": "send",
                "messaging.operation.name": "publish",
                "messaging.destination.name": publish.exchange or "amq.default",
                "messaging.rabbitmq.destination.routing_key": publish.routing_key,
                "messaging.message.id": publish.message_id or "",
                "messaging.message.body.size": len(publish.body),
                "steadyrabbit.copy": publish.copy,
            },
        ):
            self._propagation.inject(publish.headers)
            await call_next(publish)

    async def on_worker_stop(self, worker: WorkerView) -> None:
        self._end(list(self._open))

    def _end_abandoned(self) -> None:
        """End the spans of deliveries that will never be settled: their channel closed
        (the broker redelivers them, under a span of their own). Oldest first, up to the first
        still in play, so each costs O(1) once."""
        abandoned = []
        for message in self._open:
            if message.settleable or message.handed_off:
                break
            abandoned.append(message)
        self._end(abandoned)

    def _end(self, messages: Iterable[Message]) -> None:
        for message in messages:
            span = self._open.pop(message)
            span.set_attribute("steadyrabbit.outcome", "unsettled")
            span.set_status(Status(StatusCode.ERROR, "the channel closed before its settlement"))
            span.end()
