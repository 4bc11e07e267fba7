"""Counters a worker keeps; plain integers on the hot path, read by tests, logs and metrics."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Stats:
    """A worker's counters. The per-message ones are kept per queue (:attr:`queues`, one
    :class:`QueueCounts` per consumer) and summed here when read: the hot path counts once.
    ``acked`` counts every basic.ack sent: handled messages, and originals whose retry or
    dead-letter copy was confirmed."""

    queues: list[QueueCounts] = field(default_factory=list)
    requeued_unstarted: int = 0
    requeued_aged: int = 0
    stale_settlements_dropped: int = 0
    handler_errors: int = 0
    channel_recoveries: int = 0
    consumer_cancels: int = 0
    loop_stalls: int = 0
    reconnects: Counter[str] = field(default_factory=Counter)

    @property
    def reconnect_count(self) -> int:
        return sum(self.reconnects.values())

    @property
    def delivered(self) -> int:
        return sum(queue.delivered for queue in self.queues)

    @property
    def acked(self) -> int:
        return sum(queue.acked for queue in self.queues)

    @property
    def retried(self) -> int:
        return sum(queue.retried for queue in self.queues)

    @property
    def dead_lettered(self) -> int:
        return sum(queue.dead_lettered for queue in self.queues)

    @property
    def resettled(self) -> int:
        return sum(queue.resettled for queue in self.queues)

    @property
    def handed_off(self) -> int:
        return sum(queue.handed_off for queue in self.queues)

    @property
    def duplicates(self) -> int:
        return sum(queue.duplicates for queue in self.queues)

    @property
    def markers(self) -> int:
        return sum(queue.markers for queue in self.queues)

    @property
    def succeeded(self) -> int:
        """Messages whose handler succeeded (see :attr:`QueueCounts.succeeded`)."""
        return sum(queue.succeeded for queue in self.queues)


@dataclass(slots=True)
class QueueCounts:
    """One consumer's per-message counters (:class:`Stats` sums them for the worker)."""

    delivered: int = 0
    acked: int = 0
    retried: int = 0
    dead_lettered: int = 0
    #: Redeliveries acked without running: their copy was confirmed but the original's ack
    #: was lost with its connection.
    resettled: int = 0
    #: Deliveries acked early while their handler ran on, a marker standing for the run.
    handed_off: int = 0
    #: Copies acked without running because that message had completed before.
    duplicates: int = 0
    #: Markers settled without running: their run was over (dropped) or still alive (delayed
    #: again), and copies that waited for a run elsewhere and became its marker.
    markers: int = 0

    @property
    def succeeded(self) -> int:
        """Messages whose handler succeeded: every ack but those of the originals whose retry
        or dead-letter copy was confirmed (each acked once, and counted there), and of their
        redeliveries after a lost ack."""
        return (
            self.acked
            - self.retried
            - self.dead_lettered
            - self.resettled
            - self.duplicates
            - self.markers
        )
