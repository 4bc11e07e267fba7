"""The parent's side of the broker: declare, fill fast, check, delete.

Filling uses pika's SelectConnection with publisher confirms and a window of unconfirmed
messages (about 30k msg/s here), so a 200k-message queue is ready in seconds. Messages are
transient (delivery_mode 1) in a durable classic queue, the same for every framework.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import uuid
from collections.abc import Iterable, Iterator

import pika
import pika.exceptions
from pika.adapters.select_connection import SelectConnection

_WINDOW = 5000


def _params(url: str) -> pika.URLParameters:
    params = pika.URLParameters(url)
    params.socket_timeout = 10
    params.connection_attempts = 3
    params.retry_delay = 1
    return params


def declare(url: str, queue: str) -> None:
    connection = pika.BlockingConnection(_params(url))
    try:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True)
    finally:
        connection.close()


def fill(
    url: str,
    queue: str,
    bodies: Iterable[bytes],
    count: int,
    properties: pika.BasicProperties | Iterable[pika.BasicProperties],
    timeout: float,
) -> float:
    """Publish ``count`` bodies to ``queue`` (default exchange), each confirmed by the broker.

    ``properties``: the same for every message, or one per message (a ``message_id`` each,
    say). Returns the seconds it took. Raises if the broker nacked a message or time ran out.
    """
    source: Iterator[bytes] = iter(bodies)
    if isinstance(properties, pika.BasicProperties):
        properties = itertools.repeat(properties)
    props: Iterator[pika.BasicProperties] = iter(properties)
    state = {"sent": 0, "confirmed": 0, "error": None}
    started = time.perf_counter()
    deadline = started + timeout
    holder: dict[str, object] = {}

    def fail(message: str) -> None:
        if state["error"] is None:
            state["error"] = message
        connection.close()

    def publish_more() -> None:
        channel = holder["channel"]
        assert isinstance(channel, pika.channel.Channel)
        while state["sent"] < count and state["sent"] - state["confirmed"] < _WINDOW:
            channel.basic_publish("", queue, next(source), next(props))
            state["sent"] += 1
        if time.perf_counter() > deadline:
            fail(f"filling {queue} took longer than {timeout:g} s")

    def on_confirm(frame: pika.frame.Method) -> None:
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            fail(f"the broker nacked a message published to {queue}")
            return
        state["confirmed"] = max(state["confirmed"], method.delivery_tag)
        if state["confirmed"] >= count:
            connection.close()
        else:
            publish_more()

    def on_channel(channel: pika.channel.Channel) -> None:
        holder["channel"] = channel
        channel.confirm_delivery(on_confirm)
        if count:
            publish_more()
        else:
            connection.close()

    def on_open(conn: SelectConnection) -> None:
        conn.channel(on_open_callback=on_channel)

    def on_open_error(conn: SelectConnection, error: BaseException) -> None:
        state["error"] = f"cannot connect to fill {queue}: {error}"
        conn.ioloop.stop()

    def on_close(conn: SelectConnection, reason: BaseException) -> None:
        if state["confirmed"] < count and state["error"] is None:
            state["error"] = f"connection closed while filling {queue}: {reason}"
        conn.ioloop.stop()

    connection = SelectConnection(
        _params(url),
        on_open_callback=on_open,
        on_open_error_callback=on_open_error,
        on_close_callback=on_close,
    )
    connection.ioloop.call_later(timeout, lambda: fail(f"filling {queue} timed out"))
    connection.ioloop.start()
    if state["error"] is not None:
        raise RuntimeError(state["error"])
    return time.perf_counter() - started


def depth(url: str, queue: str) -> tuple[int, int]:
    """(ready messages, consumers) of ``queue``; a passive declare."""
    connection = pika.BlockingConnection(_params(url))
    try:
        result = connection.channel().queue_declare(queue, passive=True)
        return result.method.message_count, result.method.consumer_count
    finally:
        connection.close()


def wait_depth(url: str, queue: str, expected: int, timeout: float) -> int:
    """Wait until ``queue`` holds ``expected`` ready messages and no consumer; the last depth."""
    deadline = time.monotonic() + timeout
    while True:
        ready, consumers = depth(url, queue)
        if (ready == expected and consumers == 0) or time.monotonic() > deadline:
            return ready
        time.sleep(0.2)


def delete(url: str, queues: Iterable[str]) -> None:
    """Delete queues (those that do not exist are fine); never raises."""
    with contextlib.suppress(pika.exceptions.AMQPError, OSError):
        connection = pika.BlockingConnection(_params(url))
        try:
            channel = connection.channel()
            for queue in queues:
                try:
                    channel.queue_delete(queue)
                except pika.exceptions.ChannelClosed:
                    channel = connection.channel()
        finally:
            with contextlib.suppress(pika.exceptions.AMQPError):
                connection.close()


def server_version(url: str) -> str | None:
    """The broker's version from its connection.start properties."""
    with contextlib.suppress(pika.exceptions.AMQPError, OSError):
        connection = pika.BlockingConnection(_params(url))
        try:
            properties = connection._impl.server_properties or {}
            product = properties.get("product", b"RabbitMQ")
            version = properties.get("version")
            if version is None:
                return None
            product = product.decode() if isinstance(product, bytes) else str(product)
            version = version.decode() if isinstance(version, bytes) else str(version)
            return f"{product} {version}"
        finally:
            connection.close()
    return None


def repeat(body: bytes) -> Iterator[bytes]:
    return itertools.repeat(body)


def with_message_ids(properties: pika.BasicProperties) -> Iterator[pika.BasicProperties]:
    """``properties`` with a unique ``message_id`` (a random UUID) for each message."""
    fields = {name: value for name, value in vars(properties).items() if value is not None}
    while True:
        yield pika.BasicProperties(**fields, message_id=str(uuid.uuid4()))
