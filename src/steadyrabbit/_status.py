"""A worker's live status as one JSON document, and the page that shows it in a browser.

The metrics endpoint serves ``GET /status.json`` (:func:`build_status`) and ``GET /`` (the page
in ``status.html``, which polls ``/status.json`` every second and draws the throughput).
``steadyrabbit top`` reads the same document. It is built when asked for, from the state the
Prometheus collector reads too (:class:`Stats`, the consumers, the handler durations, the
broker-traffic ages): nothing here runs per message.

The counters in ``totals`` are the worker's; each consumer also has its own ``delivered``,
``succeeded``, ``acked``, ``retried``, ``dead_lettered``, ``duplicates`` (copies acked without
running: that message had completed before), ``handed_off`` (deliveries acked early while their
run went on), ``markers`` (hand-off markers settled without running) and ``handled`` (handler
calls finished). ``totals.leases_held`` counts the running handlers that hold a lease (see
:mod:`._idempotency`). The broker appears only as its masked URL.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import re
import socket
from collections.abc import Iterable
from datetime import UTC, datetime
from importlib.resources import files
from time import monotonic
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._measures import BrokerTraffic, Durations
    from ._view import ConsumerView, WorkerView

__all__ = [
    "FORMAT",
    "RECONNECT_CAUSES",
    "build_status",
    "leases_held",
    "not_ready_reason",
    "status_page",
]

#: ``format`` of the document; bumped when a field changes meaning or goes away.
FORMAT = 1
#: Reconnect causes shown (at 0) before they first happen, so that rate() sees the first one.
RECONNECT_CAUSES = ("closed_by_broker", "connect_failed", "connection_lost", "missed_heartbeats")
#: At most this many in-flight ages per consumer, oldest first: the page and ``top`` show the
#: ones nearest to consumer_timeout, and a concurrency of 500 must not make a huge document.
MAX_AGES = 20


def not_ready_reason(worker: WorkerView) -> str | None:
    """None when the worker is ready (connected, every consumer registered), else why not."""
    if worker.ready:
        return None
    if worker.stopping:
        return "stopping"
    consumers = worker.consumers
    if not consumers:
        return "starting"
    if worker.connections.get("consume") is None:
        return "not connected to the broker (connecting)"
    pending = ", ".join(repr(c.spec.queue) for c in consumers if not c.ready.is_set())
    return f"not consuming {pending} yet (restoring the channel and the consumer)"


def leases_held(consumers: Iterable[ConsumerView]) -> int:
    """Running handlers that hold a lease (a message with a key, or a handed-off run); counted
    when asked, from the messages each consumer is running."""
    return sum(
        1
        for consumer in consumers
        for message in consumer.running_messages()
        if message.lease is not None
    )


def build_status(
    worker: WorkerView,
    durations: dict[str, Durations],
    traffic: BrokerTraffic,
    *,
    started: float,
    started_at: float,
) -> dict[str, Any]:
    """The status document of ``worker`` (JSON-ready); call on the worker's event loop.

    ``started`` is when the worker started, by ``time.monotonic()``; ``started_at`` the same
    moment by ``time.time()``.
    """
    now = monotonic()
    settings = worker.settings
    stats = worker.stats
    connections = worker.connections
    traffic.look(connections)
    links: dict[str, dict[str, Any]] = {}
    for role, connection in connections.items():
        links[role] = {
            "connected": connection is not None,
            "broker": None if connection is None else connection.address.display,
            "traffic_age_seconds": _round(traffic.age(role)),
        }
    consume = connections.get("consume")
    watchdog = worker.watchdog
    consumers = worker.consumers
    return {
        "format": FORMAT,
        "kind": "steadyrabbit.status",
        "worker": {
            "name": settings.name,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": datetime.fromtimestamp(started_at, UTC).isoformat(timespec="seconds"),
            "uptime_seconds": round(now - started, 3),
        },
        "ready": worker.ready,
        "not_ready_reason": not_ready_reason(worker),
        "consumer_timeout_seconds": settings.consumer_timeout,
        "heartbeat_seconds": worker.negotiated_heartbeat,
        # The broker being consumed from, else the first one configured; masked either way.
        "broker": (consume.address if consume is not None else settings.addresses[0]).display,
        "connections": links,
        "broker_traffic_age_seconds": links.get("consume", {}).get("traffic_age_seconds"),
        "loop_lag_seconds": None if watchdog is None else _round(watchdog.lag),
        "loop_lag_max_seconds": None if watchdog is None else _round(max(0.0, watchdog.max_lag)),
        "totals": {
            "delivered": stats.delivered,
            "succeeded": stats.succeeded,
            "acked": stats.acked,
            "retried": stats.retried,
            "dead_lettered": stats.dead_lettered,
            "requeued_unstarted": stats.requeued_unstarted,
            "requeued_aged": stats.requeued_aged,
            "handler_errors": stats.handler_errors,
            "stale_acks_dropped": stats.stale_settlements_dropped,
            "channel_recoveries": stats.channel_recoveries,
            "consumer_cancels": stats.consumer_cancels,
            "loop_stalls": stats.loop_stalls,
            "duplicates": stats.duplicates,
            "handed_off": stats.handed_off,
            "markers": stats.markers,
            "in_flight": sum(c.in_flight for c in consumers),
            "waiting": sum(c.waiting for c in consumers),
            "leases_held": leases_held(consumers),
        },
        "reconnects": {
            cause: stats.reconnects[cause]
            for cause in sorted({*RECONNECT_CAUSES, *stats.reconnects})
        },
        "consumers": [
            _consumer(c, durations.get(c.spec.queue), now) for c in consumers
        ],
    }


def _consumer(consumer: ConsumerView, recorded: Durations | None, now: float) -> dict[str, Any]:
    spec = consumer.spec
    # The messages whose handler runs (kept while metrics are on). A message whose channel
    # closed is still being handled, but the broker has requeued it already: its ack will be
    # dropped, so its age no longer counts against consumer_timeout.
    ages = sorted(
        (
            now - message.received_at
            for message, _started in consumer.running()
            if message.settleable
        ),
        reverse=True,
    )
    since = consumer.oldest_unacked()
    counts = consumer.counts
    return {
        "queue": spec.queue,
        "handler": spec.name,
        "ready": consumer.ready.is_set(),
        "concurrency": spec.concurrency,
        "prefetch": consumer.prefetch_window,
        "prefetch_reason": consumer.window_reason,
        "in_flight": consumer.in_flight,
        "waiting": consumer.waiting,
        "handled": 0 if recorded is None else sum(recorded.counts),
        "handler_seconds_total": 0.0 if recorded is None else round(recorded.total, 6),
        "delivered": counts.delivered,
        "succeeded": counts.succeeded,
        "acked": counts.acked,
        "retried": counts.retried,
        "dead_lettered": counts.dead_lettered,
        "duplicates": counts.duplicates,
        "handed_off": counts.handed_off,
        "markers": counts.markers,
        "oldest_unacked_age_seconds": 0.0 if since is None else round(max(0.0, now - since), 3),
        "in_flight_ages_seconds": [round(age, 3) for age in ages[:MAX_AGES]],
        "in_flight_ages_omitted": max(0, len(ages) - MAX_AGES),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@functools.cache
def status_page() -> tuple[bytes, str]:
    """The status page (``status.html``) and its Content-Security-Policy.

    The page is self-contained and fetches only ``status.json`` next to it, so the policy
    allows nothing else: its one inline script and one inline style by their hashes.
    """
    page = files(__package__).joinpath("status.html").read_bytes()
    text = page.decode()
    hashes = {
        kind: " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
            for body in re.findall(rf"<{kind}>(.*?)</{kind}>", text, re.DOTALL)
        )
        for kind in ("script", "style")
    }
    policy = (
        f"default-src 'none'; script-src {hashes['script']}; style-src {hashes['style']}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return page, policy
