"""The message a handler receives."""

from __future__ import annotations

from collections.abc import Mapping
from time import monotonic
from typing import TYPE_CHECKING, Any

import pika
import pika.spec

if TYPE_CHECKING:
    from ._amqp import AmqpChannel


class Message:
    """One delivery. ``body`` is the raw bytes; ``payload`` the decoded body (or ``body``).

    It remembers the channel that delivered it: a settlement goes to that channel only, and is
    dropped if that channel is gone (the broker has requeued the delivery by then).
    """

    __slots__ = ("_channel", "_method", "_properties", "body", "payload", "queue", "received_at")

    def __init__(
        self,
        channel: AmqpChannel,
        method: pika.spec.Basic.Deliver,
        properties: pika.spec.BasicProperties,
        body: bytes,
        queue: str,
    ) -> None:
        self._channel = channel
        self._method = method
        self._properties = properties
        self.body = body
        self.payload: Any = body
        self.queue = queue
        self.received_at = monotonic()

    @property
    def delivery_tag(self) -> int:
        return self._method.delivery_tag or 0

    @property
    def redelivered(self) -> bool:
        return bool(self._method.redelivered)

    @property
    def exchange(self) -> str:
        return str(self._method.exchange)

    @property
    def routing_key(self) -> str:
        return str(self._method.routing_key)

    @property
    def properties(self) -> pika.spec.BasicProperties:
        return self._properties

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self._properties.headers or {})

    @property
    def content_type(self) -> str | None:
        return self._properties.content_type

    @property
    def message_id(self) -> str | None:
        return self._properties.message_id

    def __repr__(self) -> str:
        return (
            f"<Message queue={self.queue!r} tag={self.delivery_tag} "
            f"routing_key={self.routing_key!r} bytes={len(self.body)}>"
        )


def persistent_copy(
    properties: pika.spec.BasicProperties,
    headers: Mapping[str, Any],
    *,
    keep_expiration: bool = False,
) -> pika.spec.BasicProperties:
    """The properties of a copy steadyrabbit publishes: the same, persistent, with ``headers``.

    A retry or dead-letter copy drops the per-message ``expiration``: it would expire the copy
    out of a queue that has nowhere to dead-letter it. A replay restores the message as it was.
    """
    return pika.spec.BasicProperties(
        content_type=properties.content_type,
        content_encoding=properties.content_encoding,
        headers=dict(headers),
        delivery_mode=pika.DeliveryMode.Persistent,
        priority=properties.priority,
        correlation_id=properties.correlation_id,
        reply_to=properties.reply_to,
        expiration=properties.expiration if keep_expiration else None,
        message_id=properties.message_id,
        timestamp=properties.timestamp,
        type=properties.type,
        user_id=properties.user_id,
        app_id=properties.app_id,
        cluster_id=properties.cluster_id,
    )
