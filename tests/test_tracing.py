"""OpenTelemetry tracing (steadyrabbit.otel), read from the SDK's in-memory exporter: one trace
from publish through two failed attempts, the dead letter and a replay to the last consume."""

from __future__ import annotations

import subprocess
import sys

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from steadyrabbit import App, Message, Publisher, RetryPolicy, Worker, replay_dead_letters
from steadyrabbit.otel import Tracing
from tests.conftest import Admin, MakeSettings, Settled

pytestmark = pytest.mark.anyio


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_one_trace_from_publish_through_retries_dead_letter_and_replay(
    queue_name: str,
    admin: Admin,
    make_settings: MakeSettings,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    admin.declare(queue_name)
    tracing = Tracing(tracer_provider=provider)
    settled = Settled()
    app = App(middleware=[tracing, settled], retry=RetryPolicy(max_attempts=2, delays=(0.05,)))
    failing = True

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        if failing:
            raise ValueError("backend down")

    settings = make_settings()
    root_tracer = provider.get_tracer("test")
    try:
        async with Worker(app, settings):
            with root_tracer.start_as_current_span("checkout") as root:
                async with Publisher(settings, middleware=[tracing]) as publisher:
                    await publisher.publish(b"order", routing_key=queue_name, message_id="o-1")
            await settled.wait_for(2)  # attempt 1 retried, attempt 2 dead-lettered
            failing = False
            replayed = await replay_dead_letters(settings, queue_name)
            assert replayed.replayed == 1
            await settled.wait_for(3)
    finally:
        admin.delete(f"{queue_name}.retry.50ms")

    spans = exporter.get_finished_spans()
    trace_id = root.get_span_context().trace_id
    assert {span.context.trace_id for span in spans} == {trace_id}, "one trace"
    by_id = {span.context.span_id: span for span in spans}
    processes = sorted(
        (s for s in spans if s.name == f"process {queue_name}"), key=lambda s: s.start_time or 0
    )
    outcomes = [(s.attributes or {}).get("steadyrabbit.outcome") for s in processes]
    assert outcomes == ["retry", "dead_letter", "ack"]
    assert [(s.attributes or {}).get("steadyrabbit.attempt") for s in processes] == [1, 2, 1]
    assert [s.status.status_code for s in processes] == [
        StatusCode.ERROR, StatusCode.ERROR, StatusCode.UNSET
    ]  # fmt: skip
    assert all(s.kind is SpanKind.CONSUMER for s in processes)
    assert processes[0].events[0].name == "exception"

    # The chain of parents: checkout -> publish -> process 1 -> retry copy -> process 2 ->
    # dead-letter copy -> process 3 (the replay keeps the dead letter's headers).
    (publish,) = [s for s in spans if s.name == "publish amq.default"]
    assert parent_of(publish) == root.get_span_context().span_id
    assert publish.kind is SpanKind.PRODUCER
    assert parent_of(processes[0]) == publish.context.span_id
    retry_copy = by_id[parent_of(processes[1]) or 0]
    assert retry_copy.name == f"publish {queue_name}.retry.50ms"
    assert parent_of(retry_copy) == processes[0].context.span_id
    dead_letter = by_id[parent_of(processes[2]) or 0]
    assert dead_letter.name == f"publish {queue_name}.dlq"
    assert parent_of(dead_letter) == processes[1].context.span_id
    attributes = processes[2].attributes or {}
    assert attributes["messaging.system"] == "rabbitmq"
    assert attributes["messaging.message.id"] == "o-1"


async def test_a_sync_handlers_publishes_are_children_of_its_delivery(
    queue_name: str,
    admin: Admin,
    make_settings: MakeSettings,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    downstream = f"{queue_name}.out"
    admin.declare(queue_name)
    admin.declare(downstream)
    settled = Settled()
    app = App(middleware=[Tracing(tracer_provider=provider), settled])
    inner = provider.get_tracer("handler")

    @app.consumer(queue_name)
    def forward(message: Message) -> None:  # runs in a thread
        with inner.start_as_current_span("work"):
            pass
        message.blocking_publisher.publish(b"next", routing_key=downstream)

    try:
        async with Worker(app, make_settings()):
            await admin.run(admin.publish, queue_name, [b"first"])
            await settled.wait_for(1)
    finally:
        admin.delete(downstream)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    process = spans[f"process {queue_name}"]
    assert parent_of(spans["work"]) == process.context.span_id
    assert parent_of(spans["publish amq.default"]) == process.context.span_id


def test_import_steadyrabbit_loads_no_opentelemetry() -> None:
    code = (
        "import sys, steadyrabbit, steadyrabbit.testing\n"
        "print(any(m.startswith('opentelemetry') for m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"
