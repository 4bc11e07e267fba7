"""Alert grouping and muting: pure logic on an explicit clock, no I/O.

Events are grouped by kind, queue or connection, and error type. A new group waits
``group_wait`` so that a burst ends up in one notification; a notified group is muted for
``repeat_interval`` and what happened meanwhile is reported once, in a follow-up.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

DEAD_LETTERED = "dead_lettered"
RECONNECTS = "reconnects"
STUCK = "stuck"
CONSUMER_TIMEOUT = "consumer_timeout"
LOOP_BLOCKED = "loop_blocked"


@dataclass(frozen=True)
class AlertEvent:
    """Something worth an alert. ``error_type`` groups; ``error`` and ``body`` illustrate."""

    kind: str
    error_type: str
    error: str
    queue: str | None = None
    connection: str | None = None
    body: bytes | None = None

    @property
    def key(self) -> tuple[str, str | None, str | None, str]:
        return (self.kind, self.queue, self.connection, self.error_type)


@dataclass(frozen=True)
class GroupReport:
    """One group as a notification shows it. ``count``: events since the group's previous
    notification; ``follow_up``: this group was notified before (its mute just ended)."""

    event: AlertEvent  # the first event since the previous notification
    count: int
    first_at: float  # time.time()
    last_at: float
    follow_up: bool


@dataclass
class _Group:
    event: AlertEvent
    count: int = 0
    first_at: float = 0.0
    last_at: float = 0.0
    muted_until: float = -math.inf
    held: bool = False  # events arrived while muted: due when the mute ends
    notified: bool = False


class AlertBook:
    """Groups events and decides when each group is due. Times are passed in (``now`` on a
    monotonic clock, ``wall`` for display), so the rules are testable without waiting."""

    def __init__(self, group_wait: float, repeat_interval: float) -> None:
        self._group_wait = group_wait
        self._repeat_interval = repeat_interval
        self._groups: dict[tuple[str, str | None, str | None, str], _Group] = {}
        self._flush_at: float | None = None  # when the pending new groups are sent

    def add(
        self,
        event: AlertEvent,
        now: float,
        wall: float,
        weight: int = 1,
        since: float | None = None,
    ) -> None:
        """Count ``weight`` events at ``now``; ``since`` (wall clock) backdates the first."""
        group = self._groups.get(event.key)
        if group is None:
            group = self._groups[event.key] = _Group(event)
        if group.count == 0:
            group.event = event
            group.first_at = wall if since is None else since
            if group.muted_until > now:
                group.held = True
            else:
                group.notified = False  # silent through its whole mute: new again
                if self._flush_at is None:
                    self._flush_at = now + self._group_wait
        group.count += weight
        group.last_at = wall

    def next_due(self) -> float:
        """When :meth:`take_due` will next return something (``math.inf``: nothing pending)."""
        due = math.inf if self._flush_at is None else self._flush_at
        for group in self._groups.values():
            if group.held and group.muted_until < due:
                due = group.muted_until
        return due

    def take_due(self, now: float) -> list[GroupReport]:
        """The groups due at ``now``, which are then muted for ``repeat_interval``."""
        flushing = self._flush_at is not None and self._flush_at <= now
        if flushing:
            self._flush_at = None
        reports: list[GroupReport] = []
        for key, group in list(self._groups.items()):
            if group.muted_until > now:
                continue
            if group.count == 0:
                del self._groups[key]  # silent through its whole mute: forget it
            elif group.held or flushing:
                reports.append(self._take(group, now))
        return reports

    def take_all(self, now: float) -> list[GroupReport]:
        """Every group with events not yet notified, muted or not (the worker is stopping)."""
        self._flush_at = None
        return [self._take(g, now) for g in self._groups.values() if g.count > 0]

    def _take(self, group: _Group, now: float) -> GroupReport:
        report = GroupReport(
            group.event, group.count, group.first_at, group.last_at, follow_up=group.notified
        )
        group.count = 0
        group.held = False
        group.notified = True
        group.muted_until = now + self._repeat_interval
        return report


class ReconnectCounter:
    """Reconnects of one connection within a sliding window."""

    def __init__(self, window: float) -> None:
        self._window = window
        self._times: deque[float] = deque()

    def add(self, now: float) -> int:
        """Record a reconnect at ``now``; return how many happened within the window."""
        self._times.append(now)
        while self._times[0] <= now - self._window:
            self._times.popleft()
        return len(self._times)

    @property
    def oldest(self) -> float:
        """The earliest reconnect still within the window (same clock as :meth:`add`)."""
        return self._times[0]
