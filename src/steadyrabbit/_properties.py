"""A message's AMQP properties as steadyrabbit's own value, free of any client library.

The protocol layer (:mod:`._amqp`) converts between this and what goes over the wire; every
other module, and every user, sees only this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Properties:
    """A message's AMQP 0-9-1 basic properties. ``headers`` is a copy; ``timestamp`` is in
    seconds since the epoch, as AMQP carries it."""

    content_type: str | None = None
    content_encoding: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    delivery_mode: int | None = None
    priority: int | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    expiration: str | None = None
    message_id: str | None = None
    timestamp: int | None = None
    type: str | None = None
    user_id: str | None = None
    app_id: str | None = None
    cluster_id: str | None = None  # deprecated by AMQP 0-9-1; kept so a copy loses nothing
