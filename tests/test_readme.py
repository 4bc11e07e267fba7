"""The README's examples, run as they are: against the broker where they talk to one."""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from steadyrabbit import App, BlockingPublisher, Message, Outcome, Publisher, Reject, Worker
from steadyrabbit.testing import run_handler_sync
from tests.conftest import Admin, MakeSettings, Settled, eventually

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(name: str) -> str:
    text = README.read_text()
    match = re.search(
        rf"<!-- README example {name}: .*? -->\n```python\n(.*?)```", text, re.DOTALL
    )
    assert match is not None, f"the README's {name} example is gone"
    return match.group(1)


def _compiled(name: str) -> Any:
    # dont_inherit: this file's `from __future__ import annotations` must not turn the
    # README's annotations into strings that its classes (defined in no module) cannot resolve.
    return compile(readme_block(name), "README.md", "exec", dont_inherit=True)


def run_blocks(*names: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    for name in names:
        exec(_compiled(name), namespace)
    return namespace


@pytest.fixture
def workers_module() -> Iterator[types.ModuleType]:
    """``workers.py`` as the README builds it: "Write handlers", then "Publish"."""
    module = types.ModuleType("workers")
    exec(_compiled("handlers"), module.__dict__)
    exec(_compiled("publishing"), module.__dict__)
    sys.modules["workers"] = module
    try:
        yield module
    finally:
        del sys.modules["workers"]


@pytest.mark.anyio
async def test_the_readme_middleware_sees_every_messages_decision(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    example = run_blocks("middleware")
    app: App = example["app"]
    audit = example["audit"]
    admin.declare(queue_name)

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        if message.body == b"bad":
            raise Reject("bad")

    async with Worker(app, make_settings()):
        await admin.run(admin.publish, queue_name, [b"good", b"bad", b"good"])
        await eventually(lambda: len(audit.decisions) == 3, what="three decisions")
    assert sorted(d.outcome.value for d in audit.decisions) == sorted(
        [Outcome.ACK.value, Outcome.ACK.value, Outcome.DEAD_LETTER.value]
    )


def test_the_readme_stub_tests_pass(workers_module: types.ModuleType) -> None:
    tests = run_blocks("stub")
    names = [name for name in tests if name.startswith("test_")]
    assert names == [
        "test_a_contract_without_an_id_is_dead_lettered",
        "test_an_order_is_priced_and_invoiced",
    ]
    for name in names:
        tests[name]()


@pytest.mark.anyio
async def test_the_readme_publishing_example_on_the_broker(
    workers_module: types.ModuleType, admin: Admin, make_settings: MakeSettings
) -> None:
    """Its names as they are: ``orders``, ``reminders``, the ``billing`` exchange."""
    invoices = "readme-invoices"
    with admin._connection() as connection:
        channel = connection.channel()
        channel.exchange_declare("billing", "topic", durable=True)
        for queue in ("orders", "reminders", invoices):
            channel.queue_declare(queue, durable=True)
        channel.queue_bind(invoices, "billing", "invoice.*")
    app = App()
    app.add_consumer(workers_module.price, "orders", decode="json")
    settings = make_settings()
    try:
        async with Worker(app, settings):
            order_id = await workers_module.place_order(settings, "o-7")
            assert order_id == "order-o-7"
            await eventually(lambda: admin.counts(invoices)[0] == 1, what="the invoice")

        def remind() -> str:
            with BlockingPublisher(settings) as publisher:
                return str(workers_module.remind_later(publisher, "o-7"))

        assert await admin.run(remind)
        (_, body), = admin.drain(invoices)
        assert body == b'{"order":"o-7","total":6}'
    finally:
        reminder_delay = "steadyrabbit.delay.amq.default.3600000ms"
        admin.delete("orders", "orders.dlq", "reminders", invoices, reminder_delay)
        admin.delete_exchange("billing")


def test_the_readme_typed_payload_example(capsys: pytest.CaptureFixture[str]) -> None:
    app: App = run_blocks("payloads")["app"]
    body = b'{"id": "o-1", "lines": [{"sku": "a", "qty": 2}]}'
    assert run_handler_sync(app, "orders.typed", body).decision.outcome is Outcome.ACK
    assert capsys.readouterr().out == "order o-1: 1 lines, attempt 1\n"
    bad = run_handler_sync(app, "orders.typed", b'{"lines": [{"sku": "a", "qty": 0}]}')
    assert bad.decision.reason == (
        "invalid payload (2 errors): id: Field required [missing]; lines.0.qty: Input "
        "should be greater than 0 [greater_than]"
    )


@pytest.mark.anyio
async def test_the_readme_tracing_example_exports_spans(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    example = run_blocks("tracing")
    app: App = example["app"]
    provider = example["provider"]
    # What the console exporter prints goes wherever stdout was when the SDK was imported;
    # the same spans, kept in memory, are what this test reads.
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    admin.declare(queue_name)
    settled = Settled()  # its on_settled runs before the app's (after-hooks in reverse)

    @app.consumer(queue_name, middleware=[settled])
    async def handle(message: Message) -> None:
        pass

    settings = make_settings()
    try:
        async with Worker(app, settings):
            async with Publisher(settings, middleware=[example["tracing"]]) as publisher:
                await publisher.publish(b"x", routing_key=queue_name)
            await settled.wait_for(1)
    finally:
        provider.shutdown()  # flushes the batch and stops its thread
    spans = {span.name: span for span in memory.get_finished_spans()}
    assert set(spans) == {"publish amq.default", f"process {queue_name}"}
    assert (spans[f"process {queue_name}"].attributes or {})["steadyrabbit.outcome"] == "ack"


@pytest.mark.anyio
async def test_the_readme_routing_example_on_the_broker(
    admin: Admin, make_settings: MakeSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its names as they are: the ``events`` and ``orders`` exchanges, ``orders.audit``."""
    app: App = run_blocks("routing")["app"]
    settled = Settled()
    app.middleware = (*app.middleware, settled)
    try:
        async with Worker(app, make_settings()):
            await admin.run(
                admin.publish, "", [b"x"], exchange="events", routing_key="order.eu.new"
            )
            await settled.wait_for(1)
    finally:
        admin.delete("orders.audit", "orders.audit.dlq")
        admin.delete_exchange("events")
        admin.delete_exchange("orders")
    assert capsys.readouterr().out == "audited order.eu.new\n"
