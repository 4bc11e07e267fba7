"""doctor's rules on hand-made reports: every branch of a finding, no broker, no network.

``tests/test_doctor.py`` runs the real command against real brokers; these pin down what each
rule concludes from the facts, including the cases a broker cannot easily be put in (RabbitMQ
3.12's x-consumer-timeout, measured rates, alarms).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from steadyrabbit._ops.doctor.render import can_encode, format_report
from steadyrabbit._ops.doctor.report import (
    ConsumerReport,
    DoctorReport,
    Finding,
    IdempotencyReport,
    ManagementReport,
    NodeReport,
    PlacementReport,
    QueueReport,
    ServerReport,
)
from steadyrabbit._ops.doctor.rules import (
    alarm_findings,
    applicable_consumer_timeout,
    cluster_findings,
    configured_findings,
    delivery_limit,
    delivery_limit_findings,
    handler_findings,
    heartbeat_findings,
    judge,
    live_consumer_findings,
    long_run_finding,
    management_finding,
    queue_findings,
    replica_findings,
    store_findings,
    unlimited_prefetch_finding,
)
from steadyrabbit._topology import long_run_protection

TIMEOUT = 1800.0  # RabbitMQ's default consumer_timeout, in seconds
BEFORE_3_12 = (3, 10, 7)
FROM_3_12 = (3, 12, 0)


def levels(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(finding.level, finding.check) for finding in findings]


def consumer(
    *,
    client: str | None = "pika",
    prefetch: int = 0,
    channel_prefetch: int | None = 0,
    ack_required: bool = True,
    heartbeat: int | None = 60,
    arguments: dict[str, Any] | None = None,
) -> ConsumerReport:
    return ConsumerReport(
        tag="ctag-1",
        connection="worker-a",
        client=client,
        prefetch=prefetch,
        channel_prefetch=channel_prefetch,
        ack_required=ack_required,
        heartbeat=heartbeat,
        arguments=arguments or {},
    )


def queue(**facts: Any) -> QueueReport:
    """An existing queue named "jobs" as the management API shows it, with ``facts`` changed."""
    base = QueueReport(
        name="jobs",
        exists=True,
        messages_ready=3,
        consumer_count=1,
        type="classic",
        durable=True,
        arguments={},
        effective_policy={},
        messages_unacknowledged=0,
        consumers=(),
        dead_letter_queue="jobs.dlq",
        dead_letter_queue_exists=True,
        dead_letter_messages=0,
        consumer_timeout=TIMEOUT,
        consumer_timeout_source="global",
    )
    return replace(base, **facts)


def report(**facts: Any) -> DoctorReport:
    base = DoctorReport(
        broker="amqp://guest:****@localhost:5672/%2F",
        server=ServerReport("RabbitMQ", "3.10.7", "Erlang/OTP 25", "rabbit@a", {}),
        heartbeat_requested=15,
        heartbeat_negotiated=15,
        management=ManagementReport("http://guest:****@localhost:15672", True, "available"),
        consumer_timeout=TIMEOUT,
        consumer_timeout_source="--consumer-timeout",
        prefetch=1,
        concurrency=1,
        handler_seconds=None,
        queues=(),
        alarms=(),
        blocked_connections=(),
        blocking_connections=(),
        not_checked=(),
        findings=(),
    )
    return replace(base, **facts)


# -- heartbeat -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "negotiated", "level", "says"),
    [
        (0, 0, "warning", "heartbeats are off"),
        (15, 0, "warning", "(negotiated 0 (requested 15 s))"),
        (2, 2, "warning", "below 5 s"),
        (60, 60, "info", "noticed after about 2 min"),
        (15, 15, "ok", "noticed after about 30 s"),
        (15, 10, "ok", "heartbeat 10 s (requested 15 s)"),
    ],
)
def test_heartbeat(requested: int, negotiated: int, level: str, says: str) -> None:
    [finding] = heartbeat_findings(requested, negotiated)
    assert finding.level == level
    assert says in finding.title


# -- the worker's own settings against consumer_timeout ------------------------------------------


def test_a_handler_as_long_as_the_timeout_is_critical_and_half_of_it_a_warning() -> None:
    assert levels(handler_findings(TIMEOUT, TIMEOUT, "jobs")) == [("critical", "handler-timeout")]
    [warning] = handler_findings(TIMEOUT / 2, TIMEOUT, None)
    assert warning.level == "warning"
    assert warning.queue is None
    assert handler_findings(TIMEOUT / 2 - 1, TIMEOUT, None) == []
    assert handler_findings(None, TIMEOUT, None) == []


@pytest.mark.parametrize(
    ("prefetch", "concurrency", "handler", "expected"),
    [
        (4, 4, None, [("ok", "prefetch")]),
        (2, 4, None, [("info", "prefetch")]),
        (8, 4, None, [("info", "prefetch")]),
        # 2 waves of 10 s: the last message waits ~20 s, far within the timeout.
        (8, 4, 10.0, [("info", "prefetch")]),
        # 10 waves of 90 s: ~900 s, half the timeout.
        (40, 4, 90.0, [("warning", "prefetch-timeout")]),
        (0, 4, None, [("warning", "prefetch-timeout")]),
        (0, 4, 60.0, [("critical", "prefetch-timeout")]),
        (1, 1, 2000.0, [("critical", "handler-timeout"), ("ok", "prefetch")]),
    ],
)
def test_configured_prefetch_against_the_timeout(
    prefetch: int,
    concurrency: int,
    handler: float | None,
    expected: list[tuple[str, str]],
) -> None:
    assert levels(configured_findings(prefetch, concurrency, handler, TIMEOUT)) == expected


def test_unlimited_prefetch_names_the_backlog_that_times_out() -> None:
    finding = unlimited_prefetch_finding(concurrency=2, handler=60.0, timeout=TIMEOUT)
    # 1800 s / 60 s = 30 handler runs per slot before the timeout, 2 slots.
    assert "a backlog above 60 messages times out" in finding.title
    assert finding.fix


# -- the live consumers of a queue ---------------------------------------------------------------


def test_a_foreign_consumer_with_unlimited_prefetch_is_critical_once_the_handler_is_known() -> None:
    seed1 = queue(consumers=(consumer(prefetch=0, channel_prefetch=0),))
    [unknown] = live_consumer_findings(seed1, concurrency=1, handler=None)
    assert (unknown.level, unknown.check, unknown.queue) == ("warning", "prefetch-timeout", "jobs")
    [known] = live_consumer_findings(seed1, concurrency=1, handler=30.0)
    assert known.level == "critical"
    assert "ctag-1 (worker-a, pika)" in known.detail


def test_a_channel_wide_prefetch_counts_as_the_consumers_limit() -> None:
    limited = queue(consumers=(consumer(prefetch=0, channel_prefetch=5),))
    assert live_consumer_findings(limited, concurrency=5, handler=30.0) == []
    # 100 prefetched, 5 at a time, 100 s each: the last is acked after 2000 s.
    deep = queue(consumers=(consumer(prefetch=100),))
    [finding] = live_consumer_findings(deep, concurrency=5, handler=100.0)
    assert (finding.level, finding.check) == ("critical", "prefetch-timeout")
    assert "consumer prefetch 100" in finding.title


def test_a_steadyrabbit_consumer_is_trusted_with_its_prefetch() -> None:
    """It returns aged prefetched messages itself (invariant 2)."""
    ours = queue(consumers=(consumer(client="steadyrabbit", prefetch=0),))
    assert live_consumer_findings(ours, concurrency=1, handler=30.0) == []


def test_auto_ack_and_heartbeats_off_are_named() -> None:
    careless = queue(consumers=(consumer(ack_required=False, heartbeat=0),))
    assert levels(live_consumer_findings(careless, concurrency=1, handler=None)) == [
        ("warning", "consumer-heartbeat"),
        ("info", "auto-ack"),
    ]


def test_without_the_management_api_live_consumers_are_not_judged() -> None:
    assert live_consumer_findings(queue(consumers=None), concurrency=1, handler=30.0) == []


# -- a queue -------------------------------------------------------------------------------------


def queue_levels(found: QueueReport, dlx_exists: bool | None = None) -> list[tuple[str, str]]:
    return levels(queue_findings(found, BEFORE_3_12, 1, None, TIMEOUT, dlx_exists))


def test_a_missing_queue_is_information_naming_what_a_worker_declares() -> None:
    missing = QueueReport(name="jobs", exists=False, dead_letter_queue="jobs.dlq")
    [finding] = queue_findings(missing, None, 1, None, TIMEOUT, None)
    assert (finding.level, finding.check) == ("info", "queue")
    assert "jobs.dlq" in finding.detail


def test_dead_letter_routes() -> None:
    assert queue_levels(queue()) == [("ok", "queue"), ("ok", "dead-letter")]
    waiting = queue_findings(queue(dead_letter_messages=4), None, 1, None, TIMEOUT, None)
    assert (waiting[1].level, waiting[1].fix) == ("info", "steadyrabbit dlq list jobs")
    by_exchange = queue(dead_letter_queue_exists=False, dead_letter_exchange="dlx")
    assert queue_levels(by_exchange, dlx_exists=True)[1] == ("ok", "dead-letter")
    assert queue_levels(by_exchange, dlx_exists=False)[1] == ("warning", "dead-letter")
    nowhere = queue(dead_letter_queue_exists=False)
    assert queue_levels(nowhere)[1] == ("warning", "dead-letter")


def test_without_management_a_missing_route_says_the_arguments_were_not_seen() -> None:
    unseen = QueueReport(
        name="jobs", exists=True, messages_ready=0, consumer_count=0,
        dead_letter_queue="jobs.dlq", dead_letter_queue_exists=False,
    )  # fmt: skip
    [_, route] = queue_findings(unseen, None, 1, None, TIMEOUT, None)
    assert route.level == "warning"
    assert "could not be seen" in route.detail


def test_x_consumer_timeout_is_ignored_before_3_12_and_said_so() -> None:
    argued = queue(arguments={"x-consumer-timeout": 60000})
    assert ("warning", "consumer-timeout-argument") in queue_levels(argued)
    from_3_12 = queue_findings(argued, FROM_3_12, 1, None, TIMEOUT, None)
    assert ("warning", "consumer-timeout-argument") not in levels(from_3_12)
    by_consumer = queue(consumers=(consumer(prefetch=1, arguments={"x-consumer-timeout": 1}),))
    assert ("warning", "consumer-timeout-argument") in queue_levels(by_consumer)


@pytest.mark.parametrize(
    ("unacked", "ack_rate", "expected"),
    [
        (100, 1.0, None),  # held ~100 s
        (1000, 1.0, "warning"),  # ~1000 s: past half the timeout
        (2000, 1.0, "critical"),  # ~2000 s: past the timeout
    ],
)
def test_measured_unacked_time(unacked: int, ack_rate: float, expected: str | None) -> None:
    measured = queue(messages_unacknowledged=unacked, ack_rate=ack_rate)
    found = [f.level for f in queue_findings(measured, None, 1, None, TIMEOUT, None)
             if f.check == "measured-unacked"]  # fmt: skip
    assert found == ([expected] if expected else [])


def test_a_shorter_per_queue_timeout_is_checked_against_the_handler() -> None:
    short = queue(consumer_timeout=60.0, consumer_timeout_source="policy consumer-timeout")
    found = queue_findings(short, FROM_3_12, 1, 60.0, TIMEOUT, None)
    assert [(f.level, f.queue) for f in found if f.check == "handler-timeout"] == [
        ("critical", "jobs")
    ]


def test_redeliveries_are_information_when_someone_consumes() -> None:
    assert ("info", "redeliveries") in queue_levels(queue(redeliver_rate=2.5))
    idle = queue(redeliver_rate=2.5, consumer_count=0)
    assert ("info", "redeliveries") not in queue_levels(idle)


# -- consumer_timeout per queue ------------------------------------------------------------------


def test_which_consumer_timeout_applies() -> None:
    arguments = {"x-consumer-timeout": 60000}
    policy = {"consumer-timeout": 120000}
    assert applicable_consumer_timeout(arguments, policy, BEFORE_3_12, TIMEOUT) == (
        TIMEOUT, "global"
    )  # fmt: skip
    assert applicable_consumer_timeout(arguments, policy, FROM_3_12, TIMEOUT) == (
        60.0, "queue argument x-consumer-timeout"
    )  # fmt: skip
    assert applicable_consumer_timeout(None, policy, FROM_3_12, TIMEOUT) == (
        120.0, "policy consumer-timeout"
    )  # fmt: skip
    assert applicable_consumer_timeout({"x-consumer-timeout": "soon"}, None, FROM_3_12, 5.0) == (
        5.0, "global"
    )  # fmt: skip
    assert applicable_consumer_timeout(arguments, None, None, TIMEOUT) == (TIMEOUT, "global")


# -- alarms and blocked connections --------------------------------------------------------------


def test_alarms() -> None:
    assert alarm_findings(None, None, None) == []
    assert levels(alarm_findings((), (), ())) == [
        ("ok", "alarms"),
        ("ok", "blocked-connections"),
    ]
    alarmed = alarm_findings(("memory alarm on rabbit@a",), ("publisher",), ("consumer",))
    assert levels(alarmed) == [("critical", "alarms"), ("critical", "blocked-connections")]
    assert "1 more connection will be blocked" in alarmed[0].detail


# -- the whole report ----------------------------------------------------------------------------


def test_judge_puts_the_findings_in_checklist_order() -> None:
    seen = report(
        unreachable=("amqp://other:5672: connection refused",),
        management=ManagementReport("http://localhost:15672", False, "not available: refused"),
        queues=(queue(dead_letter_queue_exists=False, dead_letter_exchange="dlx"),),
        alarms=None,
        blocked_connections=None,
        blocking_connections=None,
    )
    assert levels(list(judge(seen, {"jobs": False}))) == [
        ("warning", "unreachable"),
        ("ok", "heartbeat"),
        ("info", "management"),
        ("info", "consumer-timeout"),
        ("ok", "prefetch"),
        ("ok", "queue"),
        ("warning", "dead-letter"),
    ]
    # Unknown whether the exchange exists: not a warning.
    assert ("warning", "dead-letter") not in levels(list(judge(seen)))


def test_judge_reads_the_servers_version_for_x_consumer_timeout() -> None:
    argued = (queue(arguments={"x-consumer-timeout": 60000}),)
    old = judge(report(queues=argued))
    new = judge(report(queues=argued, server=replace(report().server, version="3.13.1")))
    assert "consumer-timeout-argument" in [f.check for f in old]
    assert "consumer-timeout-argument" not in [f.check for f in new]


@pytest.mark.parametrize(
    ("version", "release"),
    [("3.10.7", (3, 10, 7)), ("4.0", (4, 0)), ("3.12.0-beta.1", (3, 12, 0)), (None, None),
     ("unknown", None)],
)  # fmt: skip
def test_server_release(version: str | None, release: tuple[int, ...] | None) -> None:
    assert replace(report().server, version=version).release == release


def test_management_finding() -> None:
    assert management_finding(report().management).level == "ok"
    down = ManagementReport("http://localhost:15672", False, "not available: refused")
    assert management_finding(down).title.endswith(": not available: refused")


# -- long runs and the idempotency store ---------------------------------------------------------

SQLITE = "sqlite:/var/lib/steadyrabbit/leases.sqlite3"
REDIS = "redis://:****@cache:6379/0"


def test_long_runs_say_how_they_are_protected_and_mention_max_duration() -> None:
    # The sentence as gather makes it, from the broker's version, for a consumer without one.
    old = long_run_finding(long_run_protection(BEFORE_3_12, None), BEFORE_3_12)
    assert (old.level, old.check) == ("info", "long-runs")
    assert old.title == "long runs: handed off before consumer_timeout"
    assert old.detail.startswith("A run still going at 60 % of consumer_timeout is handed off")
    assert "(RabbitMQ 3.10.7 has no per-consumer timeout)." in old.detail
    assert "for a consumer without max_duration" in old.detail
    assert "max_duration changes nothing: x-consumer-timeout needs 3.12" in old.detail
    new = long_run_finding(long_run_protection(FROM_3_12, None), FROM_3_12)
    assert "needs 3.12" not in new.detail
    assert "give the consumer max_duration to also send x-consumer-timeout" in new.detail
    unknown = long_run_finding(long_run_protection((), None), None)
    assert "needs 3.12" not in unknown.detail


@pytest.mark.parametrize(
    ("store", "level", "title"),
    [
        (
            IdempotencyReport(SQLITE, True, "reachable", records=3, running=1, oldest_age=7300),
            "ok",
            f"idempotency store {SQLITE}: reachable, 3 records, 1 running, the oldest changed "
            "2 h ago",
        ),
        (
            IdempotencyReport(REDIS, True, "reachable", records=1, running=0, oldest_age=59.9),
            "ok",
            f"idempotency store {REDIS}: reachable, 1 record, 0 running, the oldest changed "
            "59 s ago",
        ),
        (
            IdempotencyReport(SQLITE, True, "reachable", records=0, running=0),
            "ok",
            f"idempotency store {SQLITE}: reachable, no records yet",
        ),
        (
            IdempotencyReport(SQLITE, True, "not-created"),
            "ok",
            f"idempotency store {SQLITE}: not created yet (a worker creates it)",
        ),
        (
            IdempotencyReport(REDIS, True, "unusable", "connection refused"),
            "critical",
            f"idempotency store {REDIS} is not usable: connection refused",
        ),
    ],
)
def test_the_idempotency_store(store: IdempotencyReport, level: str, title: str) -> None:
    [finding] = store_findings(store)
    assert (finding.level, finding.check, finding.title) == (level, "idempotency-store", title)


def test_an_unusable_store_stops_a_worker_and_the_fix_names_the_setting() -> None:
    [remote] = store_findings(IdempotencyReport(REDIS, True, "unusable", "connection refused"))
    assert "stops at start" in remote.detail
    assert "--idempotency-store" in remote.fix
    problem = "/var/lib is not writable by this user"
    [local] = store_findings(IdempotencyReport(SQLITE, True, "unusable", problem))
    assert local.title.endswith(f"is not usable: {problem}")
    assert "--state-dir" in local.fix


def test_idempotency_off_is_said_and_the_store_still_checked() -> None:
    off, store = store_findings(IdempotencyReport(SQLITE, False, "reachable", records=0))
    assert (off.level, off.check) == ("info", "idempotency")
    assert off.title == "idempotency is off: a copy of a message that completed runs again"
    assert f"still handed off, under leases in {SQLITE}" in off.detail
    assert store.check == "idempotency-store"
    assert store_findings(None) == []


def test_judge_puts_long_runs_and_the_store_after_the_worker_settings() -> None:
    seen = report(
        long_runs=long_run_protection(BEFORE_3_12, None),
        idempotency=IdempotencyReport(REDIS, True, "unusable", "connection refused"),
        queues=(queue(),),
        alarms=None,
        blocked_connections=None,
        blocking_connections=None,
    )
    seen = replace(seen, findings=judge(seen))
    assert levels(list(seen.findings)) == [
        ("ok", "heartbeat"),
        ("ok", "management"),
        ("info", "consumer-timeout"),
        ("ok", "prefetch"),
        ("info", "long-runs"),
        ("critical", "idempotency-store"),
        ("ok", "queue"),
        ("ok", "dead-letter"),
    ]
    assert seen.critical, "a worker with these settings would not start"
    document = seen.to_dict()
    assert document["idempotency"]["state"] == "unusable"
    assert document["long_runs"].endswith("(RabbitMQ 3.10.7 has no per-consumer timeout)")
    text = format_report(seen)
    assert f"✗ idempotency store {REDIS} is not usable: connection refused" in text
    assert "fix: make the store reachable, or fix --idempotency-store" in " ".join(text.split())


# -- the cluster, and where queues live ----------------------------------------------------------

FROM_4 = (4, 0, 5)
A, B, C = "rabbit@a", "rabbit@b", "rabbit@c"
THREE = (NodeReport(A, True), NodeReport(B, True), NodeReport(C, True))


def quorum(name: str = "jobs", role: Any = "queue", **facts: Any) -> PlacementReport:
    """A quorum queue with a member on each of the three nodes, all online; ``facts`` changed."""
    base = PlacementReport(
        name=name,
        role=role,
        type="quorum",
        leader=A,
        members=(A, B, C),
        online=(A, B, C),
        arguments={"x-queue-type": "quorum"},
    )
    return replace(base, **facts)


def classic(
    name: str = "jobs", role: Any = "queue", node: str = A, **facts: Any
) -> PlacementReport:
    return replace(PlacementReport(name=name, role=role, type="classic", node=node), **facts)


def family(*placements: PlacementReport) -> QueueReport:
    """The queue "jobs" with its dead-letter and retry queues placed as given."""
    return queue(type=placements[0].type, placements=placements)


def test_a_single_node_says_so_and_judges_no_replicas() -> None:
    single = (NodeReport(A, True),)
    [finding] = cluster_findings(single)
    assert (finding.level, finding.check) == ("ok", "cluster")
    assert finding.title == f"single node {A}: no cluster members or queue replicas to check"
    classics = family(classic(), classic("jobs.dlq", "dead-letter"))
    assert replica_findings(classics, single, None) == []
    # Unknown (no management API): nothing said here, the report lists it as not checked.
    assert cluster_findings(None) == []
    assert replica_findings(family(classic()), None, None) == []


def test_three_healthy_nodes_and_a_replicated_family() -> None:
    [finding] = cluster_findings(THREE)
    assert (finding.level, finding.title) == ("ok", "cluster of 3 nodes: all running, no partition")
    healthy = family(quorum(), quorum("jobs.dlq", "dead-letter"))
    [replicated] = replica_findings(healthy, THREE, BEFORE_3_12)
    assert (replicated.level, replicated.check) == ("ok", "replicas")
    assert replicated.title == (
        "queue jobs: replicated: jobs (quorum, 3 members online), jobs.dlq (quorum, 3 members "
        "online)"
    )


def test_a_stopped_member_is_a_warning_while_a_majority_runs_and_critical_after() -> None:
    one_down = (NodeReport(A, True), NodeReport(B, True), NodeReport(C, False))
    [finding] = cluster_findings(one_down)
    assert (finding.level, finding.check) == ("warning", "cluster-node")
    assert finding.title == f"cluster node {C} is not running (2 of 3 running)"
    assert finding.detail.startswith("A warning rather than critical because the running nodes")
    assert "forget_cluster_node" in finding.fix
    two_down = (NodeReport(A, True), NodeReport(B, False), NodeReport(C, False))
    [finding] = cluster_findings(two_down)
    assert finding.level == "critical"
    assert finding.title == f"cluster nodes {B}, {C} are not running (1 of 3 running)"
    assert finding.detail.startswith("Critical because the running nodes are not a majority")


def test_a_partition_is_critical_and_each_pair_named_once() -> None:
    split = (NodeReport(A, True, (C,)), NodeReport(B, True, (C,)), NodeReport(C, True, (A, B)))
    [finding] = cluster_findings(split)
    assert (finding.level, finding.check) == ("critical", "cluster-partition")
    assert finding.title == f"network partition between cluster nodes: {A} | {C}, {B} | {C}"
    assert "pause_minority" in finding.fix


def test_a_classic_queue_on_a_cluster_is_not_replicated() -> None:
    classics = family(classic(), classic("jobs.dlq", "dead-letter", B), quorum("jobs.retry.5000ms"))
    [finding] = replica_findings(classics, THREE, BEFORE_3_12)
    assert (finding.level, finding.check, finding.queue) == ("warning", "replicas", "jobs")
    assert finding.title == (
        f"queue jobs: not replicated (classic, one node each): jobs on {A}, jobs.dlq on {B}"
    )
    assert 'queue_type="quorum"' in finding.fix
    # Its node stopped: the queue is unavailable.
    one_down = (NodeReport(A, False), NodeReport(B, True), NodeReport(C, True))
    [down] = replica_findings(family(classic()), one_down, BEFORE_3_12)
    assert (down.level, down.title) == (
        "critical",
        f"queue jobs: jobs is unavailable: its node {A} is not running",
    )


def test_a_mirrored_classic_queue_is_replicated_until_rabbitmq_4() -> None:
    mirrored = family(classic(policy="ha-all", effective_policy={"ha-mode": "all"}))
    [finding] = replica_findings(mirrored, THREE, BEFORE_3_12)
    assert (finding.level, finding.check) == ("info", "replicas")
    assert "mirroring is gone in RabbitMQ 4.0" in finding.title
    [finding] = replica_findings(mirrored, THREE, FROM_4)
    assert finding.level == "warning", "4.0 ignores ha-mode: one node only"


def test_a_quorum_queue_with_an_offline_member() -> None:
    offline = family(quorum(online=(A, B)))
    one_down = (NodeReport(A, True), NodeReport(B, True), NodeReport(C, False))
    [finding] = replica_findings(offline, one_down, BEFORE_3_12)
    assert (finding.level, finding.check) == ("warning", "replicas")
    assert finding.title == f"quorum queue jobs: 2 of 3 members online (offline: {C})"
    assert finding.detail.endswith("but one more member lost stops it.")
    assert "rabbitmq-queues delete_member jobs <node>" in finding.fix
    # A member on a stopped node is offline even while the API still lists it online.
    assert replica_findings(family(quorum()), one_down, BEFORE_3_12) == [finding]
    five = tuple(NodeReport(f"rabbit@{n}", True) for n in "abcde")
    members = tuple(node.name for node in five)
    [spare] = replica_findings(family(quorum(members=members, online=members[:4])), five, None)
    assert "it survives 1 more member lost" in spare.detail


def test_a_quorum_queue_without_a_majority_is_critical() -> None:
    lost = family(quorum(online=(A,), leader=None))
    [finding] = replica_findings(lost, THREE, BEFORE_3_12)
    assert (finding.level, finding.title) == (
        "critical",
        "quorum queue jobs has no majority: 1 of 3 members online",
    )
    assert f"Offline: {B}, {C}." in finding.detail


def test_a_quorum_queue_with_fewer_members_than_running_nodes() -> None:
    [two] = replica_findings(family(quorum(members=(A, B), online=(A, B))), THREE, None)
    assert (two.level, two.title) == (
        "warning",
        "quorum queue jobs has 2 members on a cluster of 3 running nodes: losing one stops it",
    )
    assert "rabbitmq-queues add_member jobs <node>" in two.fix
    five = tuple(NodeReport(f"rabbit@{n}", True) for n in "abcde")
    [three] = replica_findings(family(quorum()), five, None)
    assert (three.level, three.title) == (
        "info",
        "quorum queue jobs has 3 members on a cluster of 5 running nodes",
    )
    assert three.detail.startswith("It survives 1 member lost")


@pytest.mark.parametrize(
    ("arguments", "policy", "version", "reported", "expected"),
    [
        ({}, {}, BEFORE_3_12, None, (None, "none")),
        ({}, {}, None, None, (None, "none")),
        ({}, {}, FROM_4, None, (20, "RabbitMQ 4's default for quorum queues")),
        ({"x-delivery-limit": 5}, {}, BEFORE_3_12, None, (5, "queue argument x-delivery-limit")),
        ({}, {"delivery-limit": 7}, FROM_4, None, (7, "policy delivery-limit")),
        ({"x-delivery-limit": 5}, {"delivery-limit": 7}, FROM_4, None, (5, "queue argument "
         "x-delivery-limit and policy delivery-limit")),
        ({"x-delivery-limit": -1}, {}, FROM_4, None, (None, "queue argument x-delivery-limit")),
        ({"x-delivery-limit": -1}, {"delivery-limit": 7}, FROM_4, None, (7, "queue argument "
         "x-delivery-limit and policy delivery-limit")),
        ({}, {}, FROM_4, 30, (30, "reported by the broker")),
        ({}, {}, FROM_4, "unlimited", (None, "reported by the broker")),
    ],
)  # fmt: skip
def test_which_delivery_limit_applies(
    arguments: dict[str, Any],
    policy: dict[str, Any],
    version: tuple[int, ...] | None,
    reported: int | str | None,
    expected: tuple[int | None, str],
) -> None:
    assert delivery_limit(arguments, policy, version, reported) == expected


def test_a_quorum_queue_on_4_without_a_dead_letter_route_drops_after_20_deliveries() -> None:
    own = family(
        quorum(),
        quorum("jobs.dlq", "dead-letter"),
        quorum(
            "jobs.retry.5000ms",
            "retry",
            arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "jobs"},
        ),
    )
    main, dlq = delivery_limit_findings(own, FROM_4)
    assert (main.level, main.check, main.queue) == ("warning", "delivery-limit", "jobs")
    assert main.title == (
        "quorum queue jobs: a message delivered more than 20 times is dropped: no dead-letter route"
    )
    assert main.detail.startswith("delivery-limit 20 (RabbitMQ 4's default for quorum queues)")
    assert "a worker that crashes or loses its connection holding the message" in main.detail
    assert main.fix.startswith(
        "add a dead-letter route to jobs.dlq by policy: rabbitmqctl set_policy jobs-dlx '^jobs$' "
        """'{"dead-letter-exchange":"","dead-letter-routing-key":"jobs.dlq"}' --apply-to queues"""
    )
    assert dlq.title.startswith("quorum queue jobs.dlq: a message delivered more than 20 times")
    assert "dlq list or dlq show" in dlq.detail
    # The same queues on 3.x have no limit: nothing to say.
    assert delivery_limit_findings(own, BEFORE_3_12) == []
    assert delivery_limit_findings(own, None) == []


def test_a_dead_letter_route_by_argument_or_policy_keeps_the_message() -> None:
    by_policy = quorum(policy="dlx", effective_policy={"dead-letter-exchange": "dead"})
    by_argument = quorum(arguments={"x-dead-letter-exchange": "dead"})
    unlimited = quorum(arguments={"x-delivery-limit": -1})
    for placement in (by_policy, by_argument, unlimited):
        assert delivery_limit_findings(family(placement), FROM_4) == [], placement
    # A classic queue has no delivery limit.
    assert delivery_limit_findings(family(classic()), FROM_4) == []
    # The policy fix says that it must be merged into the policy the queue already has.
    [merged] = delivery_limit_findings(family(quorum(policy="lazy")), FROM_4)
    assert merged.fix.endswith("(merged into its policy lazy: one policy applies)")


def test_on_3_x_only_a_delivery_limit_set_without_a_route_is_said() -> None:
    limited = family(quorum(policy="limit", effective_policy={"delivery-limit": 3}))
    [finding] = delivery_limit_findings(limited, BEFORE_3_12)
    assert finding.title == (
        "quorum queue jobs: a message delivered more than 3 times is dropped: no dead-letter route"
    )
    assert finding.detail.startswith("delivery-limit 3 (policy delivery-limit); past it")


def test_judge_puts_the_cluster_before_the_queues_and_replicas_after_each() -> None:
    one_down = (NodeReport(A, True), NodeReport(B, True), NodeReport(C, False))
    seen = report(
        server=replace(report().server, version="4.0.5"),
        nodes=one_down,
        queues=(family(quorum(online=(A, B)), classic("jobs.dlq", "dead-letter", B)),),
    )
    seen = replace(seen, findings=judge(seen))
    assert levels(list(seen.findings)) == [
        ("ok", "heartbeat"),
        ("ok", "management"),
        ("info", "consumer-timeout"),
        ("ok", "prefetch"),
        ("warning", "cluster-node"),
        ("ok", "queue"),
        ("ok", "dead-letter"),
        ("warning", "replicas"),
        ("warning", "replicas"),
        ("warning", "delivery-limit"),
        ("ok", "alarms"),
        ("ok", "blocked-connections"),
    ]
    document = seen.to_dict()
    assert document["nodes"][2] == {"name": C, "running": False, "partitions": ()}
    [placed] = document["queues"]
    assert [p["name"] for p in placed["placements"]] == ["jobs", "jobs.dlq"]
    assert placed["placements"][0]["online"] == (A, B)
    text = format_report(seen)
    assert f"cluster: 3 nodes: {A}, {B}, {C} (not running)" in text
    assert (
        f"queue jobs replicas: jobs quorum, leader {A}, members {A}, {B}, {C} (offline {C}); "
        f"jobs.dlq classic on {B}"
    ) in " ".join(text.split())


# -- the checklist -------------------------------------------------------------------------------


def test_the_checklist_in_ascii_and_the_summary_line() -> None:
    seen = report(
        queues=(queue(consumers=(consumer(prefetch=0),)),), handler_seconds=60.0, concurrency=2
    )
    seen = replace(seen, findings=judge(seen))
    text = format_report(seen, unicode=False)
    assert text.isascii()
    assert "x queue jobs: 1 consumer with unlimited prefetch: prefetch x handler" in text
    assert "queue jobs consumer ctag-1 (worker-a, pika): prefetch unlimited, manual ack" in text
    assert text.endswith("1 critical finding, 0 warnings")
    assert seen.critical
    assert seen.to_dict()["summary"] == {"ok": 6, "info": 2, "warning": 0, "critical": 1}


class _Stream:
    def __init__(self, encoding: str | None) -> None:
        self.encoding = encoding


@pytest.mark.parametrize(
    ("encoding", "expected"), [("utf-8", True), ("ascii", False), (None, False), ("nope", False)]
)
def test_can_encode(encoding: str | None, expected: bool) -> None:
    assert can_encode(_Stream(encoding)) is expected


def test_an_unset_prefetch_is_described_as_the_adaptive_window() -> None:
    from steadyrabbit._ops.doctor.rules import adaptive_window_finding

    fast = adaptive_window_finding(1, 0.0001, 1800)
    assert fast.level == "ok"
    assert "the window settles at 1000" in fast.title
    slow = adaptive_window_finding(4, 70, 1800)
    assert "the window settles at 4" in slow.title
    assert "none is sent ahead" in slow.title
    unknown = adaptive_window_finding(2, None, 5)
    assert "no message waits more than 0.25 s unstarted" in unknown.title
