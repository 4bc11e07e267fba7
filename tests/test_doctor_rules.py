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
    QueueReport,
    ServerReport,
)
from steadyrabbit._ops.doctor.rules import (
    alarm_findings,
    applicable_consumer_timeout,
    configured_findings,
    handler_findings,
    heartbeat_findings,
    judge,
    live_consumer_findings,
    long_run_finding,
    management_finding,
    queue_findings,
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
