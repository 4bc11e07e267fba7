"""Dead-letter queues: look inside ``<queue>.dlq``, replay its messages, or purge it.

Everything here is an async function usable from code; the ``steadyrabbit dlq`` commands are a
thin layer over them. A message is never in zero places: a replayed message is published with
publisher confirms, and its dead-letter copy is acked only after the broker confirmed the new
one. If anything breaks in between, the copy stays in the dead-letter queue and the message may
exist twice (at least once, never lost).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import re
import sys
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from .. import _headers as headers
from .._amqp import ACCESS_REFUSED, NOT_FOUND, AmqpChannel, AmqpConnection, first_connection
from .._errors import (
    AccessRefusedError,
    ChannelClosedError,
    ConfigurationError,
    MessageReturnedError,
    PublishRefusedError,
    Reject,
    Retry,
)
from .._message import Properties, persistent_copy
from .._preview import body_preview
from .._settings import Settings
from .._topology import dead_letter_queue_name
from .._url import mask_url

__all__ = [
    "DeadLetter",
    "DeadLetterMessage",
    "DeadLetterReport",
    "ReplayResult",
    "error_headline",
    "exception_name",
    "format_dead_letter",
    "format_dead_letters",
    "list_dead_letters",
    "purge_dead_letters",
    "replay_dead_letters",
    "show_dead_letter",
]

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class DeadLetter:
    """One message of a dead-letter queue, as :func:`list_dead_letters` shows it.

    ``position`` counts from 1 at the head of the queue. Header fields are None when the header
    is absent (a message that did not come from steadyrabbit); URL passwords in ``reason`` are
    masked. ``body_preview`` is at most 80 characters, non-printable characters escaped;
    ``body_size`` is in bytes.
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
class DeadLetterMessage:
    """One message of a dead-letter queue, whole, as :func:`show_dead_letter` returns it.

    Message ``position`` (from 1, as :func:`list_dead_letters` numbers them) of ``count`` in
    ``dead_letter_queue``. ``ours``: every steadyrabbit header; ``headers``: all the others
    (the user's, the broker's); ``properties``: the AMQP properties that are set, headers
    aside. Values are as they came off the wire.
    """

    queue: str
    dead_letter_queue: str
    position: int
    count: int
    summary: DeadLetter
    ours: dict[str, Any]
    headers: dict[str, Any]
    properties: dict[str, Any]
    body: bytes

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready document; ``body`` is the text (None if not UTF-8), ``body_base64``
        always the exact bytes. URL passwords in header values are masked."""
        try:
            text: str | None = self.body.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        return {
            "queue": self.queue,
            "dead_letter_queue": self.dead_letter_queue,
            "position": self.position,
            "count": self.count,
            "steadyrabbit": {key: _jsonable(value) for key, value in self.ours.items()},
            "properties": {key: _jsonable(value) for key, value in self.properties.items()},
            "headers": {key: _jsonable(value) for key, value in self.headers.items()},
            "body_size": len(self.body),
            "body": text,
            "body_base64": base64.b64encode(self.body).decode("ascii"),
        }


@dataclass(frozen=True)
class ReplayResult:
    """What :func:`replay_dead_letters` did.

    ``total``: messages in the dead-letter queue when the replay started (at most this many were
    looked at). ``replayed``: moved back. ``skipped``: looked at but left in place (they did not
    match the error or message id filter). ``remaining``: of those ``total``, how many are still
    in the dead-letter queue (``total - replayed``; messages dead-lettered while the replay ran
    are not counted). ``stopped``: the stop event ended the replay early.

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


_text = headers.header_text


def _attempts(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _masked(text: str | None) -> str | None:
    # A handler's exception text can hold a URL with its password (the consumer records it
    # as it was raised); nothing steadyrabbit prints shows one.
    return None if text is None else mask_url(text)


def _dead_letter(position: int, props: Properties, body: bytes) -> DeadLetter:
    found: dict[str, Any] = props.headers
    return DeadLetter(
        position=position,
        reason=_masked(_text(found.get(headers.REASON))),
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


_PROPERTY_NAMES = (
    "content_type",
    "content_encoding",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
    "cluster_id",
)


def _whole(
    queue: str, position: int, count: int, props: Properties, body: bytes
) -> DeadLetterMessage:
    found: dict[str, Any] = props.headers
    return DeadLetterMessage(
        queue=queue,
        dead_letter_queue=dead_letter_queue_name(queue),
        position=position,
        count=count,
        summary=_dead_letter(position, props, body),
        ours={key: value for key, value in found.items() if key.startswith(headers.PREFIX)},
        headers={key: value for key, value in found.items() if not key.startswith(headers.PREFIX)},
        properties={
            name: getattr(props, name)
            for name in _PROPERTY_NAMES
            if getattr(props, name) is not None
        },
        body=body,
    )


def _jsonable(value: object) -> Any:
    """A header or property value as JSON: tables and arrays (x-death) kept, text masked."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return mask_url(value)
    if isinstance(value, bytes):
        return mask_url(value.decode("utf-8", errors="backslashreplace"))
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return mask_url(str(value))


def _wanted(
    props: Properties, error_filter: str | None, message_id: str | None
) -> bool:
    if message_id is not None and props.message_id != message_id:
        return False
    if error_filter is None:
        return True
    found: dict[str, Any] = props.headers
    wanted = error_filter.casefold()
    return any(
        wanted in (_text(found.get(key)) or "").casefold()
        for key in (headers.REASON, headers.EXCEPTION)
    )


def _replay_properties(props: Properties) -> Properties:
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
    dlq = dead_letter_queue_name(queue)
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


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or limit < 0):
        raise ConfigurationError(f"limit must be a number >= 0, not {limit!r}")


async def _peek(
    settings: Settings, queue: str, wanted: int, purpose: str
) -> tuple[int, list[tuple[Properties, bytes]]]:
    """The ready count of ``<queue>.dlq`` and up to ``wanted`` messages from its head.

    They are taken without ack and all given back at the end (nack with requeue), so the queue
    is left as it was, in the same order (the broker marks them redelivered).
    """
    dlq = dead_letter_queue_name(queue)
    async with _connection(settings, purpose) as connection:
        channel = await connection.channel()
        count = await _count(channel, queue)
        taken: list[tuple[Properties, bytes]] = []
        last_tag = 0
        try:
            while len(taken) < min(wanted, count):
                got = await channel.get(dlq)
                if got is None:
                    break
                last_tag, props, body = got
                taken.append((props, body))
        finally:
            if last_tag and channel.is_open:
                # Every unacked delivery of this channel, in order: back to where they were.
                channel.nack(last_tag, requeue=True, multiple=True)
    return count, taken


# -- the operations ----------------------------------------------------------------------------


async def list_dead_letters(settings: Settings, queue: str, *, limit: int = 20) -> DeadLetterReport:
    """How many messages ``<queue>.dlq`` holds, and the first ``limit`` of them.

    ``queue`` is the original queue's name. The queue is left as it was, in the same order
    (the broker marks the messages looked at redelivered).
    """
    _check_limit(limit)
    count, taken = await _peek(settings, queue, limit, "list")
    entries = tuple(
        _dead_letter(position, props, body)
        for position, (props, body) in enumerate(taken, start=1)
    )
    return DeadLetterReport(
        queue=queue, dead_letter_queue=dead_letter_queue_name(queue), count=count, entries=entries
    )


async def show_dead_letter(settings: Settings, queue: str, position: int) -> DeadLetterMessage:
    """Message ``position`` (from 1 at the head) of ``<queue>.dlq``, whole.

    The queue is left as it was, in the same order. Raises :class:`ConfigurationError` when the
    queue holds fewer messages.
    """
    if isinstance(position, bool) or position < 1:
        raise ConfigurationError(f"the position must be a number >= 1, not {position!r}")
    count, taken = await _peek(settings, queue, position, "show")
    if len(taken) < position:
        held = "message" if len(taken) == 1 else "messages"
        raise ConfigurationError(
            f"there is no message {position} in {dead_letter_queue_name(queue)}: it holds "
            f"{len(taken)} {held}"
        )
    props, body = taken[-1]
    return _whole(queue, position, max(count, len(taken)), props, body)


async def replay_dead_letters(
    settings: Settings,
    queue: str,
    *,
    limit: int | None = None,
    error_filter: str | None = None,
    message_id: str | None = None,
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
    or exception type contains this text (case-insensitive); ``message_id``: only messages with
    this message id; the others stay, in order. ``limit``: replay at most this many.
    ``progress(done, total)`` is called at the start and after each message looked at (``done``
    counts replayed and skipped ones; ``total`` is how many may be looked at). Setting ``stop``
    ends the replay after the message in hand.
    """
    _check_limit(limit)
    dlq = dead_letter_queue_name(queue)
    filtered = error_filter is not None or message_id is not None
    async with _connection(settings, "replay") as connection:
        getter = await connection.channel()
        total = await _count(getter, queue)
        publisher = await connection.channel()
        await publisher.enable_confirms()
        planned = total if limit is None or filtered else min(total, limit)
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
                tag, props, body = got
                if not _wanted(props, error_filter, message_id):
                    unacked = tag  # held: given back in place at the end
                    skipped += 1
                else:
                    held, unacked = unacked, tag
                    target = _text(props.headers.get(headers.QUEUE)) or queue
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
    props: Properties,
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
        return await channel.purge(dead_letter_queue_name(queue))


# -- for people: the table of `dlq list`, the whole message of `dlq show` ------------------------

_GAP = "  "
_EXCEPTION_CHARS = 30
_WHEN_CHARS = 32
# The error gets the width the other columns leave, at least this much (a terminal narrower
# than that gets longer lines); the body is shown only if the whole error leaves it this much
# (or all it needs, if less).
_ERROR_MIN = 20
_BODY_MIN = 12
_UNCUT = sys.maxsize  # body_preview with this limit only escapes

# Raised to choose an outcome, not a cause: the consumer records the cause's type when there is
# one, so these names say nothing about what failed.
_CONTROL_FLOW = frozenset(f"{kind.__module__}.{kind.__qualname__}" for kind in (Retry, Reject))
# What the consumer and the relay put before the part that differs from message to message:
# the attempts have their column, and one queue relays to one URL.
_GAVE_UP = re.compile(r"gave up after \d+ attempts: ")
_RELAY_CALL = re.compile(r"POST \S+ (?:answered |failed: )?")


def exception_name(exception: str | None) -> str | None:
    """The exception type as a table shows it: the class name alone, and nothing for
    :class:`Retry` or :class:`Reject` raised without a cause."""
    if not exception or exception in _CONTROL_FLOW:
        return None
    return exception.rsplit(".", 1)[-1]


def error_headline(letter: DeadLetter) -> str:
    """The part of a dead letter's reason that tells it apart, first: ``503: <body>`` for the
    relay's ``gave up after 5 attempts: POST <url> answered 503: <body>``, the message alone
    for ``ValueError: <message>`` (the type has its own column). "-" without a reason."""
    if letter.reason is None:
        return "-"
    text = _GAVE_UP.sub("", letter.reason, count=1)
    text = _RELAY_CALL.sub("", text, count=1)
    name = exception_name(letter.exception)
    if name is not None:
        text = text.removeprefix(f"{name}: ")
    return text or letter.reason


def _when(stamp: str | None) -> str:
    """A failure time in UTC to the second (``2024-05-01T12:05:00Z``); as stored if not ISO."""
    if stamp is None:
        return "-"
    try:
        moment = dt.datetime.fromisoformat(stamp)
    except ValueError:
        return body_preview(stamp, _WHEN_CHARS)
    if moment.tzinfo is None:
        return body_preview(stamp, _WHEN_CHARS)
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cut(escaped: str, width: int) -> str:
    """An already escaped preview cut to ``width``, never in the middle of an escape."""
    if len(escaped) <= width:
        return escaped
    kept = escaped[: max(0, width - 3)]
    backslash = kept.rfind("\\", max(0, len(kept) - 9))
    if backslash != -1:
        kept = kept[:backslash]
    return kept + "..."


def format_dead_letters(report: DeadLetterReport, width: int | None = None) -> str:
    """The report as a count and a table, one line per message: the error first, then the
    exception type, when it last failed and after how many attempts, then the body.

    ``width``: the most characters a line may take (a terminal's width). The error gets what the
    other columns leave; the body column only what the whole error leaves, and it is left out
    when that is too little (``dlq show`` has it). None: nothing is cut but the body preview.
    """
    if report.count == 0:
        return f"{report.dead_letter_queue} is empty"
    noun = "message" if report.count == 1 else "messages"
    head = f"{report.dead_letter_queue}: {report.count} {noun}"
    if len(report.entries) < report.count:
        head += f" (showing the first {len(report.entries)}; see --limit)"
    if not report.entries:
        return head
    errors = [error_headline(entry) for entry in report.entries]
    positions = ["#", *(str(entry.position) for entry in report.entries)]
    names = (exception_name(entry.exception) or "-" for entry in report.entries)
    exceptions = ["EXCEPTION", *(body_preview(name, _EXCEPTION_CHARS) for name in names)]
    whens = ["FAILED AT", *(_when(entry.failed_at) for entry in report.entries)]
    attempts = [
        "ATTEMPTS",
        *("-" if entry.attempts is None else str(entry.attempts) for entry in report.entries),
    ]
    fixed = [max(map(len, column)) for column in (positions, exceptions, whens, attempts)]
    natural_error = max(len("ERROR"), *(len(body_preview(error, _UNCUT)) for error in errors))
    natural_body = max(len("BODY"), *(len(entry.body_preview) for entry in report.entries))
    if width is None:
        error_width, body_width = natural_error, natural_body
    else:
        room = width - sum(fixed) - len(_GAP) * len(fixed)  # for the error, and the body
        body_width = min(natural_body, room - natural_error - len(_GAP))
        if body_width < min(natural_body, _BODY_MIN):
            body_width = 0
        error_width = min(natural_error, max(_ERROR_MIN, room))
    error_cells = ["ERROR", *(body_preview(error, error_width) for error in errors)]
    body_cells = ["BODY", *(_cut(entry.body_preview, body_width) for entry in report.entries)]
    lines = [head]
    for row in range(len(positions)):
        cells = [
            positions[row].rjust(fixed[0]),
            error_cells[row].ljust(error_width),
            exceptions[row].ljust(fixed[1]),
            whens[row].ljust(fixed[2]),
            attempts[row].rjust(fixed[3]),
        ]
        if body_width:
            cells.append(body_cells[row])
        lines.append(_GAP.join(cells).rstrip())
    return "\n".join(lines)


# Our headers in the order an operator reads them; any others follow, sorted.
_OUR_ORDER = (
    headers.REASON,
    headers.EXCEPTION,
    headers.ATTEMPTS,
    headers.FIRST_FAILED_AT,
    headers.FAILED_AT,
    headers.QUEUE,
    headers.EXCHANGE,
    headers.ROUTING_KEY,
    headers.CC,
    headers.BCC,
    headers.USER_ID,
)


def _shown(value: object) -> str:
    """A header or property value on one line: text as it is, tables as JSON, escaped."""
    data = _jsonable(value)
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return body_preview(text, _UNCUT)


def _hex_dump(data: bytes) -> list[str]:
    lines = []
    for offset in range(0, len(data), 16):
        chunk = data[offset : offset + 16]
        hexes = " ".join(f"{byte:02x}" for byte in chunk)
        printable = "".join(chr(byte) if 0x20 <= byte < 0x7F else "." for byte in chunk)
        lines.append(f"{offset:08x}  {hexes:<47}  |{printable}|")
    return lines


def format_dead_letter(message: DeadLetterMessage) -> str:
    """The message whole, for a terminal: every steadyrabbit header, the properties, the other
    headers, then the body as text (UTF-8; control characters escaped) or as a hex dump."""
    lines = [f"{message.dead_letter_queue}: message {message.position} of {message.count}"]

    def section(title: str, values: Mapping[str, object]) -> None:
        lines.append(f"{title}:" if values else f"{title}: none")
        lines.extend(f"  {name}: {_shown(value)}" for name, value in values.items())

    ours = {key: message.ours[key] for key in _OUR_ORDER if key in message.ours}
    ours.update({key: message.ours[key] for key in sorted(message.ours) if key not in ours})
    section("steadyrabbit headers", ours)
    properties: dict[str, object] = dict(message.properties)
    timestamp = properties.get("timestamp")
    if isinstance(timestamp, int) and not isinstance(timestamp, bool):
        with_time = dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        properties["timestamp"] = f"{timestamp} ({with_time})"
    section("properties", properties)
    section("headers", message.headers)
    size = len(message.body)
    noun = "byte" if size == 1 else "bytes"
    try:
        text = message.body.decode("utf-8")
    except UnicodeDecodeError:
        lines.append(f"body: {size} {noun}, not UTF-8 text (hex)")
        lines.extend(_hex_dump(message.body))
    else:
        lines.append(f"body: {size} {noun}, UTF-8 text")
        # Line breaks kept; every other control character escaped, so that a body cannot drive
        # the terminal.
        lines.extend(body_preview(line, _UNCUT) for line in text.split("\n"))
    return "\n".join(lines)
