"""What the metrics endpoint measures as the worker runs: handler durations and broker traffic.

Plain data, read at scrape time by the Prometheus collector and the status document alike.
"""

from __future__ import annotations

from bisect import bisect_left
from time import monotonic
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._amqp import AmqpConnection

#: Upper bounds of the handler-duration buckets, in seconds: from a no-op to a handler that
#: runs for most of RabbitMQ's default consumer_timeout (30 min).
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
)  # fmt: skip
_BUCKET_LABELS = (*(repr(bound) for bound in DURATION_BUCKETS), "+Inf")


class Durations:
    """A histogram of handler durations for the event loop's thread alone: no lock, one bisect
    per observation. Read at scrape time (on the same thread) by the collector."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        buckets: list[tuple[str, float]] = []
        running = 0
        for label, count in zip(_BUCKET_LABELS, self.counts, strict=True):
            running += count
            buckets.append((label, running))
        return buckets


class BrokerTraffic:
    """Seconds since bytes last came from the broker, per connection, without a polling task.

    pika counts the bytes it reads but keeps no timestamp; each look (a scrape or a probe)
    compares the count with the previous look's. So the age under-reports by at most the time
    between two looks: fine for alerting on a connection gone silent for heartbeats' worth.
    """

    def __init__(self) -> None:
        self._seen: dict[str, tuple[AmqpConnection, int, float]] = {}

    def look(self, connections: dict[str, AmqpConnection | None]) -> None:
        now = monotonic()
        for role, connection in connections.items():
            if connection is None:
                continue  # while reconnecting the silence goes on
            seen = self._seen.get(role)
            received = connection.bytes_received
            if seen is None or seen[0] is not connection or seen[1] != received:
                self._seen[role] = (connection, received, now)

    def age(self, role: str) -> float | None:
        seen = self._seen.get(role)
        return None if seen is None else monotonic() - seen[2]
