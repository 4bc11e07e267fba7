"""Headers steadyrabbit puts on the copies it makes (retries and dead letters)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PREFIX = "x-steadyrabbit-"
ATTEMPTS = "x-steadyrabbit-attempts"  # failed handler runs so far
FIRST_FAILED_AT = "x-steadyrabbit-first-failed-at"
FAILED_AT = "x-steadyrabbit-failed-at"  # the last failure
REASON = "x-steadyrabbit-reason"  # the last error, readable
EXCEPTION = "x-steadyrabbit-exception"  # its exception type
QUEUE = "x-steadyrabbit-queue"  # where the message was consumed: replay sends it back there
EXCHANGE = "x-steadyrabbit-exchange"  # the original exchange and routing key
ROUTING_KEY = "x-steadyrabbit-routing-key"
PUBLISH_ID = "x-steadyrabbit-publish-id"  # matches a basic.return to its publish
QUORUM_DELIVERY_COUNT = "x-delivery-count"  # set by quorum queues on redelivery


def attempts(headers: Mapping[str, Any] | None) -> int:
    """Failed attempts recorded on a message; 0 for a first delivery or a malformed header."""
    value = (headers or {}).get(ATTEMPTS)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def without_ours(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """The headers with every steadyrabbit header removed (and RabbitMQ's x-death history)."""
    return {
        key: value
        for key, value in (headers or {}).items()
        if not key.startswith(PREFIX) and key not in _BROKER_HISTORY
    }


# What RabbitMQ adds when it dead-letters (our retry queues do, every cycle).
_BROKER_HISTORY = frozenset(
    {"x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
     "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason"}
)
