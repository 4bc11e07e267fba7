"""What doctor saw and what it concluded: plain frozen data, no I/O.

:class:`DoctorReport` is the whole answer of :func:`~.gather.diagnose`; the rules
(:mod:`.rules`) read it to make :class:`Finding` s and the renderer (:mod:`.render`) prints it.
``to_dict()`` is the ``doctor --json`` document. Values that doctor could not learn (no
management API) are None. Also here: the few words the rules and the renderer share (durations,
counts), so that a finding's title and the checklist around it read alike.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = [
    "LEVELS",
    "TIMES",
    "ConsumerReport",
    "DoctorReport",
    "Finding",
    "IdempotencyReport",
    "Level",
    "ManagementReport",
    "NodeReport",
    "PlacementReport",
    "QueueReport",
    "RetryQueueReport",
    "ServerReport",
    "plural",
    "seconds",
]

Level = Literal["ok", "info", "warning", "critical"]
LEVELS: tuple[Level, ...] = ("ok", "info", "warning", "critical")

TIMES = "\N{MULTIPLICATION SIGN}"
_STEADYRABBIT_PRODUCT = "steadyrabbit"


def seconds(value: float) -> str:
    """``90 s``, ``30 min``: whole minutes from two minutes on."""
    if value >= 120 and value % 60 == 0:
        return f"{value / 60:g} min"
    return f"{value:g} s"


def plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


@dataclass(frozen=True)
class Finding:
    """One line of the checklist. ``fix`` is one sentence, empty when there is nothing to do."""

    level: Level
    check: str
    title: str
    detail: str = ""
    fix: str = ""
    queue: str | None = None


@dataclass(frozen=True)
class ConsumerReport:
    """A live consumer of a queue, as the management API shows it.

    ``prefetch``: the consumer's own limit (0 = none); ``channel_prefetch``: the channel-wide
    limit (``basic.qos`` with ``global``), 0 = none, None = unknown. ``heartbeat`` is its
    connection's negotiated heartbeat (None = unknown); ``client`` its client library.
    """

    tag: str
    connection: str
    client: str | None
    prefetch: int
    channel_prefetch: int | None
    ack_required: bool
    heartbeat: int | None
    arguments: dict[str, Any]

    @property
    def effective_prefetch(self) -> int:
        """Messages it may hold unacked; 0 = unlimited."""
        if self.prefetch > 0:
            return self.prefetch
        return self.channel_prefetch or 0

    @property
    def is_steadyrabbit(self) -> bool:
        return self.client == _STEADYRABBIT_PRODUCT

    @property
    def label(self) -> str:
        """``tag (connection, client)``, as findings and the checklist name a consumer."""
        client = f", {self.client}" if self.client else ""
        return f"{self.tag} ({self.connection}{client})"


@dataclass(frozen=True)
class RetryQueueReport:
    name: str
    messages: int | None


@dataclass(frozen=True)
class NodeReport:
    """A cluster member as ``/api/nodes`` shows it. ``partitions``: the members it cannot see
    (a network partition); a stopped member reports none."""

    name: str
    running: bool
    partitions: tuple[str, ...] = ()


PlacementRole = Literal["queue", "dead-letter", "retry"]


@dataclass(frozen=True)
class PlacementReport:
    """Where one queue of a consumed queue's family (the queue, its dead-letter queue, its
    retry queues) lives, and what decides whether the broker may drop its messages.

    ``node``: a classic queue's node; ``leader``, ``members`` and ``online``: a quorum queue's
    (or a stream's) Raft leader, the nodes that hold a replica and those of them that answer.
    ``arguments`` and ``effective_policy``: its ``x-`` arguments and the definition of the
    policy that applies, for the delivery limit and the dead-letter route.
    """

    name: str
    role: PlacementRole
    type: str | None
    node: str | None = None
    leader: str | None = None
    members: tuple[str, ...] | None = None
    online: tuple[str, ...] | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    policy: str | None = None
    effective_policy: dict[str, Any] = field(default_factory=dict)
    #: The delivery limit as the broker reports it (newer brokers: a number or "unlimited");
    #: None: not reported, the rules work it out from the arguments and the policy.
    delivery_limit: int | str | None = None


@dataclass(frozen=True)
class QueueReport:
    """What doctor learned about one queue. None means "not known" (no management API)."""

    name: str
    exists: bool
    messages_ready: int | None = None
    consumer_count: int | None = None
    type: str | None = None
    durable: bool | None = None
    arguments: dict[str, Any] | None = None
    policy: str | None = None
    effective_policy: dict[str, Any] | None = None
    messages_unacknowledged: int | None = None
    ack_rate: float | None = None
    redeliver_rate: float | None = None
    consumers: tuple[ConsumerReport, ...] | None = None
    dead_letter_queue: str = ""
    dead_letter_queue_exists: bool | None = None
    dead_letter_messages: int | None = None
    dead_letter_exchange: str | None = None
    retry_queues: tuple[RetryQueueReport, ...] | None = None
    consumer_timeout: float | None = None
    consumer_timeout_source: str | None = None
    #: The queue, then its dead-letter and retry queues that exist; None: not known.
    placements: tuple[PlacementReport, ...] | None = None


@dataclass(frozen=True)
class ServerReport:
    product: str | None
    version: str | None
    platform: str | None
    cluster_name: str | None
    capabilities: dict[str, bool]

    @property
    def release(self) -> tuple[int, ...] | None:
        """The version as numbers, ``(3, 10, 7)``; None when the server did not say."""
        match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", self.version or "")
        if match is None:
            return None
        return tuple(int(part) for part in match.groups() if part is not None)


@dataclass(frozen=True)
class ManagementReport:
    """``url`` is masked; ``status`` says why it was not available."""

    url: str
    available: bool
    status: str


StoreState = Literal["reachable", "not-created", "unusable"]


@dataclass(frozen=True)
class IdempotencyReport:
    """The lease store a worker with these settings opens at start (see ``_idempotency``).

    ``store``: its description, password masked. ``state``: ``reachable`` (opened, read and
    closed), ``not-created`` (a SQLite file a worker would create; doctor creates nothing) or
    ``unusable`` (``problem`` says why, in words the rules quote). ``enabled`` is
    ``Settings.idempotency``: off, the store still holds the leases of hand-offs.
    ``oldest_age``: seconds since the oldest record last changed.
    """

    store: str
    enabled: bool
    state: StoreState
    problem: str | None = None
    records: int | None = None
    running: int | None = None
    oldest_age: float | None = None


@dataclass(frozen=True)
class DoctorReport:
    broker: str
    server: ServerReport
    heartbeat_requested: int
    heartbeat_negotiated: int
    management: ManagementReport
    consumer_timeout: float
    consumer_timeout_source: str
    prefetch: int
    concurrency: int
    handler_seconds: float | None
    queues: tuple[QueueReport, ...]
    alarms: tuple[str, ...] | None
    blocked_connections: tuple[str, ...] | None
    blocking_connections: tuple[str, ...] | None
    not_checked: tuple[str, ...]
    findings: tuple[Finding, ...]
    unreachable: tuple[str, ...] = field(default=())
    #: No --prefetch given: the worker's window follows its handler durations.
    adaptive_prefetch: bool = False
    #: The lease store; None: not checked.
    idempotency: IdempotencyReport | None = None
    #: How a run longer than consumer_timeout is protected on this broker, in one sentence
    #: (``_topology.long_run_protection``, no handler's max_duration); None: not checked.
    long_runs: str | None = None
    #: The cluster's members (one for a single node); None: not known (no management API).
    nodes: tuple[NodeReport, ...] | None = None

    def count(self, level: Level) -> int:
        return sum(1 for finding in self.findings if finding.level == level)

    @property
    def critical(self) -> bool:
        return self.count("critical") > 0

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["summary"] = {level: self.count(level) for level in LEVELS}
        document["critical"] = self.critical
        return document
