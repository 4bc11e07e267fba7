"""The message a handler receives."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import replace
from time import monotonic
from typing import TYPE_CHECKING, Any

from . import _headers
from ._amqp import from_wire
from ._errors import ClosedByUserError
from ._properties import Properties

if TYPE_CHECKING:
    from ._amqp import AmqpChannel, Deliver, WireProperties
    from ._outbound import AsyncPublishing, BlockingPublishing

    Publishers = tuple[AsyncPublishing, BlockingPublishing]

__all__ = [
    "Message",
    "Properties",
    "delivery_channel",
    "fingerprint",
    "log_event",
    "one_line",
    "persistent_copy",
    "wire_headers",
]


class Message:
    """One delivery. ``body`` is the raw bytes; ``payload`` the decoded body (or ``body``).

    It remembers the channel that delivered it: a settlement goes to that channel only, and is
    dropped if that channel is gone (the broker has requeued the delivery by then).
    """

    __slots__ = (
        "_channel",
        "_method",
        "_properties",
        "_publishers",
        "blocked_loop",
        "body",
        "handed_off",
        "lease",
        "payload",
        "queue",
        "received_at",
        "settled",
    )

    def __init__(
        self,
        channel: AmqpChannel,
        method: Deliver,
        properties: WireProperties,
        body: bytes,
        queue: str,
        publishers: Publishers | None = None,
    ) -> None:
        self._channel = channel
        self._publishers = publishers
        self._method = method
        self._properties = properties
        self.body = body
        self.payload: Any = body
        self.queue = queue
        self.received_at = monotonic()
        #: Set by the loop-lag watchdog (from its thread) when this message's async handler
        #: blocked the event loop: seconds of the longest stall seen.
        self.blocked_loop = 0.0
        #: The lease (key, token) this run holds, if any (see :mod:`._leases`).
        self.lease: tuple[str, str] | None = None
        #: True once the delivery was acked early, a marker copy standing for the run (a
        #: hand-off): nothing acks it again, and a failure's copy is published without an ack.
        self.handed_off = False
        #: True once acked or nacked: a delivery is settled once, never twice.
        self.settled = False

    @property
    def delivery_tag(self) -> int:
        return self._method.delivery_tag or 0

    @property
    def redelivered(self) -> bool:
        return bool(self._method.redelivered)

    @property
    def exchange(self) -> str:
        """The exchange the message was first published to, on every delivery: a retry or a
        replay comes back through steadyrabbit's own queues, which record the original."""
        original = (self._properties.headers or {}).get(_headers.EXCHANGE)
        return _text(original) if original is not None else str(self._method.exchange)

    @property
    def routing_key(self) -> str:
        """The routing key the message was first published with, on every delivery (see
        :attr:`exchange`)."""
        original = (self._properties.headers or {}).get(_headers.ROUTING_KEY)
        return _text(original) if original is not None else str(self._method.routing_key)

    @property
    def attempt(self) -> int:
        """Which attempt this delivery is: 1 for the first, 2 after one failure, and so on."""
        return _headers.attempts(self._properties.headers) + 1

    @property
    def properties(self) -> Properties:
        """The message's AMQP properties, as steadyrabbit's own value (built when asked)."""
        return from_wire(self._properties, self.headers)

    @property
    def settleable(self) -> bool:
        """Whether the message can still be acked: not settled yet (a hand-off settles it), and
        the channel that delivered it still open (after that, the broker has requeued it)."""
        return not self.settled and not self._channel.closed.done()

    @property
    def headers(self) -> dict[str, Any]:
        """The message's headers, without the one steadyrabbit uses internally to match a
        returned publish (it is on every copy it published)."""
        headers = dict(self._properties.headers or {})
        headers.pop(_headers.PUBLISH_ID, None)
        return headers

    @property
    def content_type(self) -> str | None:
        return self._properties.content_type

    @property
    def message_id(self) -> str | None:
        return self._properties.message_id

    @property
    def publisher(self) -> AsyncPublishing:
        """Publish from an async handler: ``await message.publisher.publish(body,
        routing_key=...)``, confirmed, on the worker's own publishing connection (the same API
        as :class:`steadyrabbit.Publisher`). Published before the handler returns, so before
        this message is acked: a consume-then-publish pipeline loses nothing."""
        return self._bound_publishers()[0]

    @property
    def blocking_publisher(self) -> BlockingPublishing:
        """:attr:`publisher` for a sync handler (it runs in a thread):
        ``message.blocking_publisher.publish(body, routing_key=...)`` blocks until confirmed."""
        return self._bound_publishers()[1]

    def _bound_publishers(self) -> Publishers:
        if self._publishers is None:
            raise ClosedByUserError(
                "this message came from no worker or test stub: it has no publisher"
            )
        return self._publishers

    def __repr__(self) -> str:
        return (
            f"<Message queue={self.queue!r} tag={self.delivery_tag} "
            f"routing_key={self.routing_key!r} bytes={len(self.body)}>"
        )


def delivery_channel(message: Message) -> AmqpChannel:
    """The channel that delivered ``message``: its settlement goes there and nowhere else."""
    return message._channel


def log_event(event: str, message: Message, **fields: object) -> dict[str, object]:
    """``extra=`` of a log record about ``message``: the JSON log format shows ``event`` as its
    message and these fields (queue, message id, attempt and ``fields``) beside it; the plain
    format shows the record's own sentence."""
    return {
        "event": event,
        "fields": {
            "queue": message.queue,
            "message_id": message.message_id,
            "attempt": message.attempt,
            **fields,
        },
    }


def one_line(error: BaseException) -> str:
    """``Type: text`` of an exception on one line (its text may span several)."""
    text = " ".join(str(error).split())
    name = type(error).__name__
    return f"{name}: {text}" if text else name


def wire_headers(message: Message) -> Mapping[str, Any] | None:
    """The headers as they came off the wire, not copied (for :func:`._decision.decide`)."""
    return message._properties.headers


_PERSISTENT = 2  # delivery_mode: written to disk by a durable queue


def _text(value: object) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def persistent_copy(
    properties: Properties,
    headers: Mapping[str, Any],
    *,
    keep_expiration: bool = False,
) -> Properties:
    """The properties of a copy steadyrabbit publishes: the same, persistent, with ``headers``.

    A retry or dead-letter copy drops the per-message ``expiration``: it would expire the copy
    out of a queue that has nowhere to dead-letter it. A replay restores the message as it was.

    A copy goes only where steadyrabbit sends it: ``CC``/``BCC`` (extra routing keys) and
    ``user_id`` (checked against the publishing login, so a foreign one is refused with 406)
    are moved under steadyrabbit's own headers, for the record, and never restored.
    """
    copy_headers = _headers.routing_neutral(headers)
    previous = properties.headers
    for kept in (_headers.CC, _headers.BCC, _headers.USER_ID):
        if kept in previous:
            copy_headers.setdefault(kept, previous[kept])
    if properties.user_id is not None:
        copy_headers.setdefault(_headers.USER_ID, properties.user_id)
    return replace(
        properties,
        headers=copy_headers,
        delivery_mode=_PERSISTENT,
        expiration=properties.expiration if keep_expiration else None,
        user_id=None,
    )


def fingerprint(message: Message, vhost: str) -> str:
    """Identify a delivery across redeliveries: by message id if it has one, else by content,
    and by attempt. A retry copy carries its original's id: without the attempt, the copy,
    redelivered, would be taken for its original's redelivery (settled by that original's
    confirmed copy, without running: lost)."""
    digest = hashlib.sha256()
    for part in (vhost, message.queue, message.message_id or "", str(message.attempt)):
        digest.update(part.encode())
        digest.update(b"\0")
    if not message.message_id:
        digest.update(message.routing_key.encode())
        digest.update(b"\0")
        digest.update(message.body)
    return digest.hexdigest()
