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
# What the original carried that would change where a copy goes or whom the broker checks it
# against: kept here for the record, never restored (see routing_neutral).
CC = "x-steadyrabbit-cc"
BCC = "x-steadyrabbit-bcc"
USER_ID = "x-steadyrabbit-user-id"
QUORUM_DELIVERY_COUNT = "x-delivery-count"  # set by quorum queues on redelivery
# On a marker (see _leases): the lease key and the token of the run it stands for.
LEASE_KEY = "x-steadyrabbit-lease-key"
LEASE_TOKEN = "x-steadyrabbit-lease-token"


def header_text(value: object) -> str | None:
    """A header value as text (AMQP long strings arrive as bytes); None stays None."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


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


# Headers RabbitMQ reads as extra routing keys ("sender-selected distribution"): a copy that kept
# them would also go to every queue they name, on every retry.
ROUTING_HEADERS = {"CC": CC, "BCC": BCC}


def routing_neutral(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """The headers with the ones that change routing moved under steadyrabbit's own names.

    RabbitMQ matches ``CC`` and ``BCC`` by exact name; the originals' values stay readable (dlq
    show) but a copy never fans out. Existing records of an earlier copy are kept.
    """
    result = dict(headers or {})
    for routing, ours in ROUTING_HEADERS.items():
        if routing in result:
            value = result.pop(routing)
            result.setdefault(ours, value)
    return result


def for_marker(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """The headers of a marker: the message's own, its failure record included (a hand-off is
    no attempt), without the publish id and the broker's delivery history."""
    return {
        key: value
        for key, value in (headers or {}).items()
        if key != PUBLISH_ID and key not in _BROKER_HISTORY
    }


# What a replay keeps of steadyrabbit's headers: where the message came from, for its handler,
# and the records of what it carried. The failure record (attempts, reason, times) starts again.
_KEPT_ON_REPLAY = frozenset({EXCHANGE, ROUTING_KEY, CC, BCC, USER_ID})


def for_replay(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """The headers of a dead letter as ``dlq replay`` sends it back to its queue.

    User headers stay, with the original exchange and routing key and the CC/BCC/user_id
    records. Attempts, failure details, the publish id and the broker's delivery history go
    (a quorum dead-letter queue counts every look into it in ``x-delivery-count``), and any
    CC/BCC header becomes a record: a replay goes to one queue only.
    """
    found = headers or {}
    replayed = without_ours(found)
    replayed.pop(QUORUM_DELIVERY_COUNT, None)
    replayed.update({key: value for key, value in found.items() if key in _KEPT_ON_REPLAY})
    return routing_neutral(replayed)


# What RabbitMQ adds when it dead-letters (our retry queues do, every cycle), and the delivery
# counts quorum queues add: a copy starts a new life in another queue, which counts its own.
_BROKER_HISTORY = frozenset(
    {"x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
     "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason",
     QUORUM_DELIVERY_COUNT, "x-acquired-count"}
)
