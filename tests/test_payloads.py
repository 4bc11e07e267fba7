"""Typed payloads: pydantic models, dataclasses and TypedDicts, validated; a body that does not
validate is dead-lettered at once with its errors by field path, never its values."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field
from typing_extensions import TypedDict  # pydantic wants it on Python < 3.12

from steadyrabbit import App, ConfigurationError, Message, Outcome, Worker
from steadyrabbit._headers import REASON
from steadyrabbit.testing import run_handler_sync
from tests.conftest import Admin, MakeSettings, Settled


class Line(BaseModel):
    sku: str
    qty: int = Field(gt=0)


class Order(BaseModel):
    id: str
    customer: str
    lines: list[Line]


@dataclasses.dataclass
class Address:
    street: str
    zip: str


@dataclasses.dataclass
class Shipment:
    order: str
    to: Address
    express: bool = False


class Refund(TypedDict):
    order: str
    cents: int


app = App()
received: list[Any] = []


@app.consumer("orders")
def take_order(order: Order) -> None:
    received.append(order)


@app.consumer("shipments")
async def ship(shipment: Shipment, message: Message) -> None:
    received.append((shipment, message.routing_key))


@app.consumer("refunds", decode="json")
def refund(refund: Refund) -> None:
    received.append(refund)


@app.consumer("plain", decode="json")
def plain(message: Message) -> None:
    received.append(message.payload)


GOOD_ORDER = {"id": "o-1", "customer": "c-9", "lines": [{"sku": "a", "qty": 2}]}


def test_a_pydantic_model_a_dataclass_and_a_typeddict_are_validated() -> None:
    received.clear()
    result = run_handler_sync(app, "orders", json.dumps(GOOD_ORDER).encode())
    assert result.decision.outcome is Outcome.ACK
    assert received[-1] == Order(id="o-1", customer="c-9", lines=[Line(sku="a", qty=2)])

    body = b'{"order": "o-1", "to": {"street": "Main 1", "zip": "1000"}}'
    result = run_handler_sync(app, "shipments", body, routing_key="ship.eu")
    assert result.decision.outcome is Outcome.ACK
    assert received[-1] == (Shipment("o-1", Address("Main 1", "1000")), "ship.eu")

    assert run_handler_sync(app, "refunds", b'{"order": "o-1", "cents": "250"}').decision.outcome \
        is Outcome.ACK
    assert received[-1] == {"order": "o-1", "cents": 250}
    # Annotated with Message (a string here, from __future__ annotations): untyped, as before.
    run_handler_sync(app, "plain", b'{"a": 1}')
    assert received[-1] == {"a": 1}


def test_nested_validation_errors_name_paths_not_values() -> None:
    secret = "4111-1111-1111-1111"
    body = json.dumps(
        {"id": "o-2", "lines": [{"sku": "a", "qty": 1}, {"sku": secret, "qty": secret}]}
    ).encode()
    decision = run_handler_sync(app, "orders", body).decision
    assert decision.outcome is Outcome.DEAD_LETTER
    assert decision.reason == (
        "invalid payload (2 errors): customer: Field required [missing]; "
        "lines.1.qty: Input should be a valid integer, unable to parse string as an integer "
        "[int_parsing]"
    )
    assert secret not in str(decision)

    shipment = b'{"order": "o-1", "to": {"street": 7}}'
    decision = run_handler_sync(app, "shipments", shipment).decision
    assert decision.reason == (
        "invalid payload (2 errors): to.street: Input should be a valid string [string_type]; "
        "to.zip: Field required [missing]"
    )
    assert run_handler_sync(app, "orders", b"{not json").decision.reason is not None


def test_an_unresolvable_annotation_is_one_sentence_at_registration() -> None:
    namespace: dict[str, Any] = {}
    exec(
        "from __future__ import annotations\n"
        "def handle(order: NoSuchModel) -> None: ...\n",
        namespace,
    )
    with pytest.raises(ConfigurationError, match="cannot resolve the annotation 'NoSuchModel'"):
        App().add_consumer(namespace["handle"], "q")
    exec(
        "import typing\n"
        "class Plain(typing.TypedDict):\n    a: int\n"
        "def plain(body: Plain) -> None: ...\n",
        namespace,
    )
    exec(
        "from pydantic import BaseModel\n"
        "class Later(BaseModel):\n    child: 'Undefined'\n"
        "def later(body: Later) -> None: ...\n",
        namespace,
    )
    with pytest.raises(ConfigurationError, match="name 'Undefined' is not defined"):
        App().add_consumer(namespace["later"], "q")
    # pydantic's own first line says what to do.
    with pytest.raises(ConfigurationError, match=r"use `typing_extensions\.TypedDict`"):
        App().add_consumer(namespace["plain"], "q")


@settings(max_examples=60, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["id", "customer", "lines", "sku", "qty"]), inner),
        max_leaves=12,
    )
)
def test_any_json_either_validates_or_is_dead_lettered_with_a_reason(document: Any) -> None:
    decision = run_handler_sync(app, "orders", json.dumps(document).encode()).decision
    if decision.outcome is Outcome.ACK:
        Order.model_validate(document)
    else:
        assert decision.outcome is Outcome.DEAD_LETTER
        assert decision.reason is not None
        assert decision.reason.startswith("invalid payload (")
        assert decision.attempt == 1


@pytest.mark.anyio
async def test_an_invalid_body_is_dead_lettered_at_once_on_the_broker(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    typed = App()
    orders: list[Order] = []
    settled = Settled()

    @typed.consumer(queue_name, middleware=[settled])
    async def take(order: Order, message: Message) -> None:
        orders.append(order)

    async with Worker(typed, make_settings()):
        await admin.run(
            admin.publish, queue_name, [json.dumps(GOOD_ORDER).encode(), b'{"id": "o-3"}']
        )
        await settled.wait_for(2)
        await asyncio.sleep(0.2)  # a retry would be on its way by now
    assert [order.id for order in orders] == ["o-1"]
    ((properties, body),) = admin.drain(f"{queue_name}.dlq")
    assert body == b'{"id": "o-3"}'
    assert (properties.headers or {})[REASON] == (
        "invalid payload (2 errors): customer: Field required [missing]; "
        "lines: Field required [missing]"
    )
    assert settled.count(Outcome.DEAD_LETTER) == 1
