"""What observers (metrics, the status page, alerts, a user's middleware) may read of a worker.

Protocols, so that those modules depend on this leaf and not on the worker or the consumer
(which would import them back): read-only by convention, cheap to call at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import asyncio

    from ._amqp import AmqpConnection
    from ._message import Message
    from ._settings import Settings
    from ._stats import QueueCounts, Stats
    from ._watchdog import LoopLagWatchdog


class SpecView(Protocol):
    """What observers read of a consumer's registration."""

    @property
    def queue(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def concurrency(self) -> int: ...

    @property
    def prefetch(self) -> int: ...


class ConsumerView(Protocol):
    """One consumer: its queue's spec, counters and the messages it holds."""

    @property
    def spec(self) -> SpecView: ...

    @property
    def counts(self) -> QueueCounts: ...

    @property
    def ready(self) -> asyncio.Event: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def waiting(self) -> int: ...

    @property
    def prefetch_window(self) -> int: ...

    @property
    def window_reason(self) -> str: ...

    def track_running(self) -> None: ...

    def running(self) -> list[tuple[Message, float]]: ...

    def running_messages(self) -> Iterable[Message]:
        """The messages whose handlers run now, whether or not metrics are on (a live view:
        read it at once, without awaiting in between)."""
        ...

    def oldest_unacked(self) -> float | None: ...


class WorkerView(Protocol):
    """A worker, as observers see it."""

    @property
    def settings(self) -> Settings: ...

    @property
    def stats(self) -> Stats: ...

    @property
    def ready(self) -> bool: ...

    @property
    def stopping(self) -> bool: ...

    @property
    def negotiated_heartbeat(self) -> int | None: ...

    @property
    def consumers(self) -> Sequence[ConsumerView]: ...

    @property
    def connections(self) -> dict[str, AmqpConnection | None]: ...

    @property
    def watchdog(self) -> LoopLagWatchdog | None: ...
