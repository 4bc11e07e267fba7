"""Declaring what a consumer needs, so that an existing queue or exchange is used as it is.

Also the one place that names the queues steadyrabbit makes for a queue: ``<queue>.dlq`` and
``<queue>.retry.<ms>ms``. The consumer, the dead-letter tools, doctor and :class:`HandlerSpec`
all ask here, so that they can never disagree on where a message went.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ._amqp import ACCESS_REFUSED, NOT_FOUND, PRECONDITION_FAILED, AmqpChannel
from ._errors import AccessRefusedError, ChannelClosedError, TopologyConflictError

OpenChannel = Callable[[], Awaitable[AmqpChannel]]

log = logging.getLogger("steadyrabbit")


_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for \w+ '(?P<name>[^']*)' in vhost '[^']*': "
    r"received (?P<received>.+?) but current is (?P<current>.+)$"
)


def _describe_value(text: str) -> str:
    text = text.strip()
    if text == "none":
        return "(not set)"
    match = re.match(r"the value (?P<value>.+?) of type '[^']+'$", text)
    return match.group("value") if match else text


def _translate(kind: str, name: str, exc: ChannelClosedError) -> Exception:
    match = _INEQUIVALENT.search(exc.reply_text)
    if exc.reply_code == PRECONDITION_FAILED and match:
        arg = match.group("arg")
        current = _describe_value(match.group("current"))
        wanted = _describe_value(match.group("received"))
        return TopologyConflictError(
            f"{kind} {name!r} already exists with {arg} = {current}, but steadyrabbit declares "
            f"it with {arg} = {wanted}: change the setting to match the existing {kind}, or "
            f"move its messages away and delete it so it can be re-declared"
        )
    if exc.reply_code == PRECONDITION_FAILED:
        return TopologyConflictError(
            f"{kind} {name!r} already exists with other properties ({exc.reply_text}); "
            f"use the existing {kind} as it is, or delete it so it can be re-created"
        )
    if exc.reply_code == ACCESS_REFUSED:
        return AccessRefusedError(f"no permission to declare {kind} {name!r}: {exc.reply_text}")
    return exc


async def _ensure(
    kind: str,
    name: str,
    channel: AmqpChannel,
    open_channel: OpenChannel,
    declare: Callable[[AmqpChannel, bool], Awaitable[object]],
) -> AmqpChannel:
    """Use ``name`` as it is if it exists (passive declaration); else create it.

    A passive declaration of something missing closes the channel, so the returned channel may
    be a new one from ``open_channel``.
    """
    try:
        await declare(channel, True)
    except ChannelClosedError as exc:
        if exc.reply_code != NOT_FOUND:
            raise _translate(kind, name, exc) from exc
    else:
        return channel
    channel = await open_channel()
    try:
        await declare(channel, False)
    except ChannelClosedError as exc:
        raise _translate(kind, name, exc) from exc
    return channel


SINGLE_ACTIVE = "x-single-active-consumer"


async def ensure_queue(
    channel: AmqpChannel,
    open_channel: OpenChannel,
    name: str,
    queue_type: str = "classic",
    *,
    single_active: bool = False,
) -> AmqpChannel:
    """Use queue ``name`` as it is (any type, any arguments); else declare it durable, of
    ``queue_type``, with no other argument but ``x-single-active-consumer`` if asked for.

    A queue's arguments cannot change, so ``single_active`` on a queue that exists is checked:
    a queue without it is a :class:`TopologyConflictError`.
    """
    arguments = queue_type_arguments(queue_type)
    if single_active:
        arguments[SINGLE_ACTIVE] = True
    channel = await _ensure(
        "queue",
        name,
        channel,
        open_channel,
        lambda ch, passive: ch.declare_queue(
            name, durable=True, passive=passive, arguments=None if passive else arguments
        ),
    )
    if single_active:
        channel = await _check_single_active(channel, open_channel, name, arguments)
    return channel


async def _check_single_active(
    channel: AmqpChannel, open_channel: OpenChannel, name: str, arguments: dict[str, Any]
) -> AmqpChannel:
    # Declaring it again with the argument succeeds if the queue has it; the broker names the
    # first argument that differs otherwise. Only a difference in this one is a conflict: a
    # queue with other arguments of its own (a length limit) is used as it is, unchecked.
    try:
        await channel.declare_queue(name, durable=True, arguments=arguments)
    except ChannelClosedError as exc:
        match = _INEQUIVALENT.search(exc.reply_text)
        if exc.reply_code != PRECONDITION_FAILED or match is None:
            raise _translate("queue", name, exc) from exc
        if match.group("arg") == SINGLE_ACTIVE:
            raise TopologyConflictError(
                f"queue {name!r} exists without single-active-consumer, and a queue's "
                f"arguments cannot change: drop single_active, or move its messages away and "
                f"delete it so steadyrabbit creates it with {SINGLE_ACTIVE}"
            ) from exc
        log.info(
            "queue %r has arguments of its own (%s): whether it is single-active-consumer "
            "could not be checked",
            name,
            match.group("arg"),
        )
        return await open_channel()
    return channel


async def bind_exchange(
    channel: AmqpChannel,
    destination: str,
    source: str,
    routing_key: str,
    arguments: Mapping[str, Any] | None = None,
) -> None:
    try:
        await channel.bind_exchange(destination, source, routing_key, arguments)
    except ChannelClosedError as exc:
        raise _translate("binding of exchange", destination, exc) from exc


async def ensure_exchange(
    channel: AmqpChannel, open_channel: OpenChannel, name: str, kind: str
) -> AmqpChannel:
    """Use exchange ``name`` as it is if it exists; else declare it durable, of type ``kind``."""
    return await _ensure(
        "exchange",
        name,
        channel,
        open_channel,
        lambda ch, passive: ch.declare_exchange(name, kind, durable=True, passive=passive),
    )


async def bind_queue(
    channel: AmqpChannel,
    queue: str,
    exchange: str,
    routing_key: str,
    arguments: Mapping[str, Any] | None = None,
) -> None:
    try:
        await channel.bind_queue(queue, exchange, routing_key, arguments)
    except ChannelClosedError as exc:
        raise _translate("binding of queue", queue, exc) from exc


@dataclass(frozen=True)
class OwnQueue:
    """A queue steadyrabbit itself declares (retry and dead-letter queues), with its arguments."""

    name: str
    arguments: dict[str, Any]


def queue_type_arguments(queue_type: str) -> dict[str, Any]:
    # A classic queue is declared without x-queue-type, so queues made before the option
    # existed (or by hand, plainly) stay equivalent.
    return {"x-queue-type": "quorum"} if queue_type == "quorum" else {}


def dead_letter_queue_name(queue: str) -> str:
    """``<queue>.dlq``, where what ``queue``'s handler gave up on (or rejected) goes."""
    return f"{queue}.dlq"


def retry_queue_name(queue: str, delay_ms: int) -> str:
    """``<queue>.retry.<ms>ms``, where a copy waits ``delay_ms`` before going back to ``queue``."""
    return f"{queue}.retry.{delay_ms}ms"


def retry_queue_pattern(queue: str) -> str:
    """A regular expression that matches the name of every retry queue of ``queue`` (as the
    management API's ``use_regex`` filter takes it)."""
    return f"^{re.escape(queue)}\\.retry\\.[0-9]+ms$"


def dead_letter_queue(queue: str, queue_type: str) -> OwnQueue:
    return OwnQueue(dead_letter_queue_name(queue), queue_type_arguments(queue_type))


def retry_queue(queue: str, delay_ms: int, queue_type: str) -> OwnQueue:
    """A queue that holds copies for ``delay_ms`` then dead-letters them back to ``queue``."""
    arguments: dict[str, Any] = {
        "x-message-ttl": delay_ms,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue,
        **queue_type_arguments(queue_type),
    }
    if queue_type == "quorum":
        # Quorum queues dead-letter at most once unless told otherwise.
        arguments["x-dead-letter-strategy"] = "at-least-once"
        arguments["x-overflow"] = "reject-publish"
    return OwnQueue(retry_queue_name(queue, delay_ms), arguments)


async def declare_own_queue(channel: AmqpChannel, queue: OwnQueue) -> None:
    """Declare one of steadyrabbit's queues with its arguments; a conflict is permanent."""
    try:
        await channel.declare_queue(queue.name, durable=True, arguments=queue.arguments)
    except ChannelClosedError as exc:
        raise _translate("queue", queue.name, exc) from exc


def copy_queue(queue: str, queue_type: str, retry_delay_ms: int | None) -> OwnQueue:
    """Where a copy of a message of ``queue`` goes: the retry queue of that delay, or (None) the
    dead-letter queue."""
    if retry_delay_ms is None:
        return dead_letter_queue(queue, queue_type)
    return retry_queue(queue, retry_delay_ms, queue_type)


#: The headers exchange a delayed publish goes through: it routes to the delay queue of the
#: message's exchange and delay (the binding matches :data:`DELAY_HEADER`), whose TTL then
#: dead-letters it to that exchange with its own routing key.
DELAY_EXCHANGE = "steadyrabbit.delay"
DELAY_HEADER = "x-steadyrabbit-delay"
_MAX_NAME_BYTES = 255


def delay_route(exchange: str, delay_ms: int) -> str:
    """The :data:`DELAY_HEADER` value that routes a message to ``delay_queue(exchange,
    delay_ms)``."""
    return f"{delay_ms}ms {exchange}"


def delay_queue(exchange: str, delay_ms: int) -> OwnQueue:
    """``steadyrabbit.delay.<exchange>.<ms>ms``: holds messages for ``exchange`` (the default
    exchange is ``amq.default``) for ``delay_ms``, then dead-letters them to it with the routing
    key they were published with. One queue per delay, as for retries: a TTL expires only at
    the head of a queue, so a short delay must never wait behind a long one."""
    shown = exchange or "amq.default"
    name = f"steadyrabbit.delay.{shown}.{delay_ms}ms"
    if len(name.encode()) > _MAX_NAME_BYTES:  # exchange names may be 255 bytes themselves
        digest = hashlib.sha256(exchange.encode()).hexdigest()[:16]
        name = f"steadyrabbit.delay.{digest}.{delay_ms}ms"
    arguments: dict[str, Any] = {"x-message-ttl": delay_ms, "x-dead-letter-exchange": exchange}
    return OwnQueue(name, arguments)


#: The first RabbitMQ that takes ``x-consumer-timeout`` as a consumer argument; older ones
#: accept it and do nothing.
CONSUMER_TIMEOUT_ARGUMENT_SINCE = (3, 12)


def consumer_timeout_argument(version: tuple[int, ...], max_duration: float | None) -> bool:
    """Whether a consumer with a ``max_duration`` sends it as ``x-consumer-timeout``."""
    return max_duration is not None and version >= CONSUMER_TIMEOUT_ARGUMENT_SINCE


def long_run_protection(version: tuple[int, ...], max_duration: float | None) -> str:
    """How a run longer than ``consumer_timeout`` is kept from tripping it, in one sentence
    (``doctor`` shows it)."""
    handoff = (
        "a run still going at 60 % of consumer_timeout is handed off: a marker waits in the "
        "delay queue, the delivery is acked, and the run goes on under its lease"
    )
    if version and version < CONSUMER_TIMEOUT_ARGUMENT_SINCE:
        shown = ".".join(map(str, version))
        return f"{handoff} (RabbitMQ {shown} has no per-consumer timeout)"
    if max_duration is None:
        return f"{handoff} (give the consumer max_duration to also send x-consumer-timeout)"
    return (
        f"x-consumer-timeout {round(max_duration * 1000)} ms is sent as a consumer argument, "
        f"and {handoff} all the same (RabbitMQ 4.0.5 was measured to ignore the argument)"
    )
