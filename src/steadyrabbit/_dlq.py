"""Dead-letter queues: look inside ``<queue>.dlq``, replay its messages, or purge it.

Everything here is an async function usable from code; the ``steadyrabbit dlq`` commands are a
thin layer over them. A message is never in zero places: a replayed message is published with
publisher confirms, and its dead-letter copy is acked only after the broker confirmed the new
one. If anything breaks in between, the copy stays in the dead-letter queue and the message may
exist twice (at least once, never lost).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import pika
import pika.spec

from . import _headers as headers
from ._amqp import ACCESS_REFUSED, NOT_FOUND, AmqpChannel, AmqpConnection, first_connection
from ._errors import (
    AccessRefusedError,
    ChannelClosedError,
    ConfigurationError,
    MessageReturnedError,
    PublishRefusedError,
)
from ._message import persistent_copy
from ._preview import body_preview
from ._settings import Settings

__all__ = [
    "DeadLetter",
    "DeadLetterReport",
    "ReplayResult",
    "dead_letter_queue",
    "list_dead_letters",
    "purge_dead_letters",
    "replay_dead_letters",
]

Progress = Callable[[int, int], None]


def dead_letter_queue(queue: str) -> str:
    """The dead-letter queue steadyrabbit declares for ``queue``."""
    return f"{queue}.dlq"


@dataclass(frozen=True)
class DeadLetter:
    """One message of a dead-letter queue, as :func:`list_dead_letters` shows it.

    ``position`` counts from 1 at the head of the queue. Header fields are None when the header
    is absent (a message that did not come from steadyrabbit). ``body_preview`` is at most
    80 characters, non-printable characters escaped; ``body_size`` is in bytes.
    """

    position: int
    reason: str | None
    exception: str | None
    attempts: int | None
    first_failed_at: str | None
    failed_at: str | None
    queue: str | None
    exchange: str | None
    routing_key: str | None
    message_id: str | None
    body_preview: str
    body_size: int


@dataclass(frozen=True)
class DeadLetterReport:
    """``count`` messages wait in ``dead_letter_queue``; ``entries`` are the first of them."""

    queue: str
    dead_letter_queue: str
    count: int
    entries: tuple[DeadLetter, ...]


@dataclass(frozen=True)
class ReplayResult:
    """What :func:`replay_dead_letters` did.

    ``total``: messages in the dead-letter queue when the replay started (at most this many were
    looked at). ``replayed``: moved back. ``skipped``: looked at but left in place (they did not
    match the error filter). ``remaining``: of those ``total``, how many are still in the
    dead-letter queue (``total - replayed``; messages dead-lettered while the replay ran are not
    counted). ``stopped``: the stop event ended the replay early.

    The broker's own message count is not used for ``remaining``: it answers the count ahead of
    the requeues it has not processed yet, so it can be too low for a moment.
    """

    queue: str
    dead_letter_queue: str
    total: int
    replayed: int
    skipped: int
    remaining: int
    stopped: bool


# -- reading headers ---------------------------------------------------------------------------


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _attempts(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _dead_letter(position: int, props: pika.spec.BasicProperties, body: bytes) -> DeadLetter:
    found: dict[str, Any] = dict(props.headers or {})
    return DeadLetter(
        position=position,
        reason=_text(found.get(headers.REASON)),
        exception=_text(found.get(headers.EXCEPTION)),
        attempts=_attempts(found.get(headers.ATTEMPTS)),
        first_failed_at=_text(found.get(headers.FIRST_FAILED_AT)),
        failed_at=_text(found.get(headers.FAILED_AT)),
        queue=_text(found.get(headers.QUEUE)),
        exchange=_text(found.get(headers.EXCHANGE)),
        routing_key=_text(found.get(headers.ROUTING_KEY)),
        message_id=_text(props.message_id),
        body_preview=body_preview(body),
        body_size=len(body),
    )


def _matches(props: pika.spec.BasicProperties, needle: str) -> bool:
    found: dict[str, Any] = dict(props.headers or {})
    wanted = needle.casefold()
    return any(
        wanted in (_text(found.get(key)) or "").casefold()
        for key in (headers.REASON, headers.EXCEPTION)
    )


def _replay_properties(props: pika.spec.BasicProperties) -> pika.spec.BasicProperties:
    """The message's properties as first published, persistent, with the headers a replay keeps
    (see :func:`._headers.for_replay`); CC, BCC and user_id stay records, never restored."""
    return persistent_copy(props, headers.for_replay(props.headers), keep_expiration=True)


# -- the connection ----------------------------------------------------------------------------


def _connection(settings: Settings, purpose: str) -> AbstractAsyncContextManager[AmqpConnection]:
    return first_connection(
        settings.addresses,
        heartbeat=settings.heartbeat,
        connect_timeout=settings.connect_timeout,
        name=f"{settings.name} dlq {purpose}",
    )


async def _count(channel: AmqpChannel, queue: str) -> int:
    """Messages ready in ``queue``'s dead-letter queue; a clear error if it does not exist.

    A missing queue closes the channel (the broker answers a passive declare with 404).
    """
    dlq = dead_letter_queue(queue)
    try:
        ready, _consumers = await channel.declare_queue(dlq, passive=True)
    except ChannelClosedError as exc:
        if exc.reply_code == NOT_FOUND:
            raise ConfigurationError(f"queue {queue!r} has no dead-letter queue {dlq}") from None
        if exc.reply_code == ACCESS_REFUSED:
            raise AccessRefusedError(
                f"no permission to use queue {dlq!r}: {exc.reply_text}"
            ) from exc
        raise
    return ready


def _tag(method: pika.spec.Basic.GetOk) -> int:
    # Always set on a basic.get-ok; typed optional because pika's spec classes default to None.
    return int(method.delivery_tag or 0)


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or limit < 0):
        raise ConfigurationError(f"limit must be a number >= 0, not {limit!r}")


# -- the operations ----------------------------------------------------------------------------


async def list_dead_letters(settings: Settings, queue: str, *, limit: int = 20) -> DeadLetterReport:
    """How many messages ``<queue>.dlq`` holds, and the first ``limit`` of them.

    ``queue`` is the original queue's name. The messages are taken without ack and all given
    back at the end (nack with requeue), so the queue is left as it was, in the same order
    (the broker marks them redelivered).
    """
    _check_limit(limit)
    dlq = dead_letter_queue(queue)
    async with _connection(settings, "list") as connection:
        channel = await connection.channel()
        count = await _count(channel, queue)
        entries: list[DeadLetter] = []
        last_tag = 0
        try:
            while len(entries) < min(limit, count):
                got = await channel.get(dlq)
                if got is None:
                    break
                method, props, body = got
                last_tag = _tag(method)
                entries.append(_dead_letter(len(entries) + 1, props, body))
        finally:
            if last_tag and channel.is_open:
                # Every unacked delivery of this channel, in order: back to where they were.
                channel.nack(last_tag, requeue=True, multiple=True)
    return DeadLetterReport(queue=queue, dead_letter_queue=dlq, count=count, entries=tuple(entries))


async def replay_dead_letters(
    settings: Settings,
    queue: str,
    *,
    limit: int | None = None,
    error_filter: str | None = None,
    progress: Progress | None = None,
    stop: asyncio.Event | None = None,
) -> ReplayResult:
    """Move the dead letters of ``<queue>.dlq`` back to the queue they were consumed from.

    Each message goes to the queue named by its ``x-steadyrabbit-queue`` header (else ``queue``)
    through the default exchange, persistent, with its properties and user headers and the
    record of its original exchange and routing key, without its failure record (so its
    attempts start again). Nothing it carries routes it elsewhere or changes whom the broker
    checks it against: CC, BCC and user_id stay records (see :func:`._headers.for_replay`).
    It is published with confirms on its own channel and its dead-letter copy acked only once
    the broker confirmed it.

    Only the messages present at the start are looked at, so messages that fail again while the
    replay runs are not replayed in a loop. ``error_filter``: replay only messages whose reason
    or exception type contains this text (case-insensitive); the others stay, in order.
    ``limit``: replay at most this many. ``progress(done, total)`` is called at the start and
    after each message looked at (``done`` counts replayed and skipped ones; ``total`` is how
    many may be looked at). Setting ``stop`` ends the replay after the message in hand.
    """
    _check_limit(limit)
    dlq = dead_letter_queue(queue)
    async with _connection(settings, "replay") as connection:
        getter = await connection.channel()
        total = await _count(getter, queue)
        publisher = await connection.channel()
        await publisher.enable_confirms()
        planned = total if limit is None or error_filter is not None else min(total, limit)
        replayed = skipped = 0
        stopped = False
        unacked = 0  # the highest delivery tag not acked: a skipped message or the one in hand
        if progress is not None:
            progress(0, planned)
        try:
            while replayed + skipped < total and (limit is None or replayed < limit):
                if stop is not None and stop.is_set():
                    stopped = True
                    break
                got = await getter.get(dlq)
                if got is None:
                    break
                method, props, body = got
                tag = _tag(method)
                if error_filter is not None and not _matches(props, error_filter):
                    unacked = tag  # held: given back in place at the end
                    skipped += 1
                else:
                    held, unacked = unacked, tag
                    target = _text((props.headers or {}).get(headers.QUEUE)) or queue
                    await _publish(publisher, target, body, props, dlq, replayed)
                    getter.ack(tag)
                    unacked = held
                    replayed += 1
                if progress is not None:
                    progress(replayed + skipped, planned)
        finally:
            if unacked and getter.is_open:
                # Every delivery not acked (skipped ones, and after an error the one in hand),
                # in one go and in order: back to their places in the queue.
                getter.nack(unacked, requeue=True, multiple=True)
    return ReplayResult(
        queue=queue,
        dead_letter_queue=dlq,
        total=total,
        replayed=replayed,
        skipped=skipped,
        remaining=total - replayed,
        stopped=stopped,
    )


async def _publish(
    channel: AmqpChannel,
    target: str,
    body: bytes,
    props: pika.spec.BasicProperties,
    dlq: str,
    replayed: int,
) -> None:
    rest = f"{replayed} replayed, the rest stay in {dlq}"
    try:
        await channel.publish_confirmed("", target, body, _replay_properties(props))
    except MessageReturnedError:
        raise ConfigurationError(
            f"cannot replay to queue {target!r}: it does not exist; {rest}"
        ) from None
    except PublishRefusedError as exc:
        raise PublishRefusedError(
            f"cannot replay to queue {target!r}: {exc}; {rest}", reply_code=exc.reply_code
        ) from exc


async def purge_dead_letters(settings: Settings, queue: str) -> int:
    """Delete every ready message of ``<queue>.dlq``; return how many were deleted."""
    async with _connection(settings, "purge") as connection:
        channel = await connection.channel()
        await _count(channel, queue)
        return await channel.purge(dead_letter_queue(queue))
