"""doctor's rules: from what it saw (a :class:`DoctorReport`) to the :class:`Finding` s.

Pure functions of plain data: no connection, no clock, no randomness. :func:`judge` applies
every rule to a report in checklist order; each rule is also callable on its own, which is how
the tests try every branch without a broker.

They name the failure modes this project exists for when their conditions are present: a
prefetched message that waits past ``consumer_timeout`` (PRECONDITION_FAILED, channel closed,
everything redelivered), heartbeats off or too short, queues without a dead-letter route, alarms
and blocked connections, ``x-consumer-timeout`` on a broker that ignores it; and on a cluster,
stopped members, partitions, queues that live on one node, and quorum queues that drop a message
delivered too often (RabbitMQ 4.x's default ``delivery-limit``) for want of a dead-letter route.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..._window import WINDOW_CAP, AdaptiveWindow, wait_budget
from .report import (
    TIMES,
    DoctorReport,
    Finding,
    IdempotencyReport,
    ManagementReport,
    NodeReport,
    PlacementReport,
    QueueReport,
    plural,
    seconds,
)

__all__ = [
    "CONSUMER_TIMEOUT_ARGUMENT_SINCE",
    "DEFAULT_DELIVERY_LIMIT",
    "DEFAULT_DELIVERY_LIMIT_SINCE",
    "HEARTBEAT_MAX",
    "HEARTBEAT_MIN",
    "adaptive_window_finding",
    "alarm_findings",
    "applicable_consumer_timeout",
    "cluster_findings",
    "configured_findings",
    "consumer_timeout_finding",
    "delivery_limit",
    "delivery_limit_findings",
    "handler_findings",
    "heartbeat_findings",
    "judge",
    "live_consumer_findings",
    "long_run_finding",
    "management_finding",
    "queue_findings",
    "replica_findings",
    "store_findings",
    "unlimited_prefetch_finding",
    "unreachable_finding",
]

# Broker facts (see DESIGN.md): 5-20 s is the recommended heartbeat; a peer is declared dead
# after two missed intervals; x-consumer-timeout is honoured from RabbitMQ 3.12 on.
HEARTBEAT_MIN = 5
HEARTBEAT_MAX = 20
CONSUMER_TIMEOUT_ARGUMENT_SINCE = (3, 12)
# From 4.0 a quorum queue without a delivery-limit of its own drops (or dead-letters) a message
# delivered more than 20 times; before, it had no limit.
DEFAULT_DELIVERY_LIMIT = 20
DEFAULT_DELIVERY_LIMIT_SINCE = (4, 0)
# Classic queue mirroring (ha-mode policies) was removed in 4.0: such a policy does nothing there.
_MIRRORING_UNTIL = (4, 0)
# A quorum queue of fewer members survives the loss of none of them.
_QUORUM_MIN_MEMBERS = 3
_SHOWN_NAMES = 3

_NO_HEARTBEAT_DETECTION = (
    "a dead broker or a silently dropped connection (NAT or firewall idle timeout, a VM "
    "paused or moved) is noticed only when TCP gives up on unacknowledged data, about 15 "
    "minutes with Linux defaults, and by an idle consumer, which sends nothing, not at all"
)
_SEED1_FAILURE = (
    "the broker closes the channel with PRECONDITION_FAILED (delivery acknowledgement timed "
    "out) and redelivers everything unacked on it; the late acks then fail on the dead channel "
    "(ChannelWrongStateError, or StreamLostError when the connection went too), and the backlog "
    "is pushed into the consumer again"
)


def judge(
    report: DoctorReport, dead_letter_exchange_exists: Mapping[str, bool | None] | None = None
) -> tuple[Finding, ...]:
    """Every finding about ``report``, in checklist order (``report.findings`` is ignored).

    ``dead_letter_exchange_exists``: per queue name, whether the dead-letter exchange its
    arguments or policy name exists (None or absent: not known).
    """
    exchanges = dead_letter_exchange_exists or {}
    findings = [unreachable_finding(problem, report.broker) for problem in report.unreachable]
    findings += heartbeat_findings(report.heartbeat_requested, report.heartbeat_negotiated)
    findings.append(management_finding(report.management))
    findings.append(consumer_timeout_finding(report.consumer_timeout))
    if report.adaptive_prefetch:
        findings += handler_findings(report.handler_seconds, report.consumer_timeout, None)
        findings.append(
            adaptive_window_finding(
                report.concurrency, report.handler_seconds, report.consumer_timeout
            )
        )
    else:
        findings += configured_findings(
            report.prefetch, report.concurrency, report.handler_seconds, report.consumer_timeout
        )
    if report.long_runs is not None:
        findings.append(long_run_finding(report.long_runs, report.server.release))
    findings += store_findings(report.idempotency)
    findings += cluster_findings(report.nodes)
    for queue in report.queues:
        findings += queue_findings(
            queue,
            report.server.release,
            report.concurrency,
            report.handler_seconds,
            report.consumer_timeout,
            exchanges.get(queue.name),
        )
        findings += replica_findings(queue, report.nodes, report.server.release)
        findings += delivery_limit_findings(queue, report.server.release)
    findings += alarm_findings(
        report.alarms, report.blocked_connections, report.blocking_connections
    )
    return tuple(findings)


def applicable_consumer_timeout(
    arguments: Mapping[str, Any] | None,
    policy: Mapping[str, Any] | None,
    version: tuple[int, ...] | None,
    global_timeout: float,
) -> tuple[float, str]:
    """The consumer_timeout (seconds) that applies to a queue with these arguments and
    effective policy on a broker of ``version``, and where it comes from."""
    honoured = version is not None and version >= CONSUMER_TIMEOUT_ARGUMENT_SINCE
    candidates: list[tuple[float, str]] = []
    if honoured:
        argument = (arguments or {}).get("x-consumer-timeout")
        if isinstance(argument, int | float) and argument > 0:
            candidates.append((argument / 1000, "queue argument x-consumer-timeout"))
        from_policy = (policy or {}).get("consumer-timeout")
        if isinstance(from_policy, int | float) and from_policy > 0:
            candidates.append((from_policy / 1000, "policy consumer-timeout"))
    if candidates:
        return min(candidates)
    return global_timeout, "global"


def unreachable_finding(problem: str, used: str) -> Finding:
    """A configured broker that did not answer, when doctor got through to ``used``."""
    return Finding(
        "warning",
        "unreachable",
        f"a configured broker did not answer: {problem}",
        f"doctor used {used}; a worker falls back the same way.",
        "check that node, or remove it from --url",
    )


def management_finding(management: ManagementReport) -> Finding:
    if management.available:
        return Finding("ok", "management", f"management API at {management.url}")
    return Finding(
        "info",
        "management",
        f"management API at {management.url}: {management.status}",
        "Without it doctor sees only what AMQP shows: ready counts and consumer counts.",
        "enable rabbitmq_management on the broker, or give --management-url",
    )


def consumer_timeout_finding(consumer_timeout: float) -> Finding:
    """The consumer_timeout every check compares against, and that the broker hides it."""
    return Finding(
        "info",
        "consumer-timeout",
        f"consumer_timeout {seconds(consumer_timeout)} (from --consumer-timeout; "
        "the broker does not expose its own)",
        "RabbitMQ's default is 30 min. If the broker's differs, pass it as "
        "--consumer-timeout: the checks below compare against this value.",
    )


def long_run_finding(protection: str, version: tuple[int, ...] | None) -> Finding:
    """How a handler that outlives consumer_timeout is kept from tripping it on a broker of
    ``version``: ``protection`` is that sentence (``_topology.long_run_protection``) for a
    consumer without ``max_duration``, since doctor does not see the handlers."""
    detail = (
        f"{protection[:1].upper()}{protection[1:]}. doctor does not see the handlers: this is "
        "for a consumer without max_duration."
    )
    if version is not None and version < CONSUMER_TIMEOUT_ARGUMENT_SINCE:
        detail += " On this broker max_duration changes nothing: x-consumer-timeout needs 3.12."
    return Finding("info", "long-runs", "long runs: handed off before consumer_timeout", detail)


def store_findings(store: IdempotencyReport | None) -> list[Finding]:
    """The lease store a worker opens at start: usable or not, and what it holds."""
    if store is None:
        return []
    findings: list[Finding] = []
    if not store.enabled:
        findings.append(
            Finding(
                "info",
                "idempotency",
                "idempotency is off: a copy of a message that completed runs again",
                "No message is deduplicated (--idempotency no). Runs near consumer_timeout are "
                f"still handed off, under leases in {store.store}.",
            )
        )
    name = f"idempotency store {store.store}"
    if store.state == "unusable":
        sqlite = store.store.startswith("sqlite:")
        findings.append(
            Finding(
                "critical",
                "idempotency-store",
                f"{name} is not usable: {store.problem or 'unknown error'}",
                "A worker with these settings opens it before consuming, and stops at start "
                "when it cannot: it holds the leases of messages with a message_id and of "
                "every hand-off.",
                "give --state-dir a directory this user can write, or set --idempotency-store"
                if sqlite
                else "make the store reachable, or fix --idempotency-store (unset: a SQLite "
                "file in --state-dir, for one host)",
            )
        )
    elif store.state == "not-created":
        findings.append(
            Finding("ok", "idempotency-store", f"{name}: not created yet (a worker creates it)")
        )
    else:
        records = store.records or 0
        held = "no records yet"
        if records:
            held = f"{plural(records, 'record')}, {store.running or 0} running"
            if store.oldest_age is not None:
                held += f", the oldest changed {_age(store.oldest_age)} ago"
        findings.append(Finding("ok", "idempotency-store", f"{name}: reachable, {held}"))
    return findings


def _age(value: float) -> str:
    """``45 s``, ``12 min``, ``5 h``, ``3 days``: whole units, for an age."""
    value = max(0.0, value)
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if value >= 2 * size:
            count = int(value // size)
            return plural(count, unit) if unit == "day" else f"{count} {unit}"
    return f"{int(value)} s"


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOWN_NAMES])
    if len(names) > _SHOWN_NAMES:
        shown += f" and {len(names) - _SHOWN_NAMES} more"
    return shown


def heartbeat_findings(requested: int, negotiated: int) -> list[Finding]:
    asked = "" if requested == negotiated else f" (requested {requested} s)"
    if negotiated == 0:
        return [
            Finding(
                "warning",
                "heartbeat",
                f"heartbeats are off (negotiated 0{asked}): a dead peer goes unnoticed for minutes",
                f"With heartbeats off, {_NO_HEARTBEAT_DETECTION}. Meanwhile the broker keeps "
                "this consumer's unacked messages. Turning heartbeats off is the usual "
                "workaround for 'Too many heartbeats missed', whose cause is a client that "
                "stops serving its connection while a handler runs; steadyrabbit keeps "
                "heartbeats on its event loop whatever the handlers do.",
                f"use --heartbeat 15 (between {HEARTBEAT_MIN} and {HEARTBEAT_MAX} s), and no "
                "heartbeat=0 in the broker URL",
            )
        ]
    detection = f"a dead peer is noticed after about {seconds(2 * negotiated)}"
    if negotiated < HEARTBEAT_MIN:
        return [
            Finding(
                "warning",
                "heartbeat",
                f"heartbeat {negotiated} s{asked} is below {HEARTBEAT_MIN} s: false alarms",
                f"{detection.capitalize()}, but a busy machine or a long garbage collection "
                "pause misses two beats that quickly, and the connection is dropped for "
                "nothing (every unacked message redelivered).",
                f"use --heartbeat between {HEARTBEAT_MIN} and {HEARTBEAT_MAX} s (15 is the "
                "default)",
            )
        ]
    if negotiated > HEARTBEAT_MAX:
        return [
            Finding(
                "info",
                "heartbeat",
                f"heartbeat {negotiated} s{asked}: {detection}",
                f"{HEARTBEAT_MIN}-{HEARTBEAT_MAX} s is the recommended range; a longer interval "
                "only delays noticing a dead connection.",
                "use --heartbeat 15 to notice a dead connection sooner",
            )
        ]
    return [Finding("ok", "heartbeat", f"heartbeat {negotiated} s{asked}: {detection}")]


def handler_findings(handler: float | None, timeout: float, queue: str | None) -> list[Finding]:
    """A handler's own duration against ``timeout``: a delivery is unacked at least that long."""
    if handler is None:
        return []
    where = f" on queue {queue}" if queue else ""
    if handler >= timeout:
        return [
            Finding(
                "critical",
                "handler-timeout",
                f"handler duration {seconds(handler)} ≥ consumer_timeout "
                f"{seconds(timeout)}{where}: every delivery times out",
                f"Each message is still unacked when the consumer_timeout expires: "
                f"{_SEED1_FAILURE}. Then it runs again, forever.",
                "make the broker's consumer_timeout longer than the slowest handler "
                "(consumer_timeout in rabbitmq.conf, in ms), or make the handler shorter",
                queue,
            )
        ]
    if handler * 2 >= timeout:
        return [
            Finding(
                "warning",
                "handler-timeout",
                f"handler duration {seconds(handler)} is at least half the "
                f"consumer_timeout {seconds(timeout)}{where}",
                "A slower day for whatever the handler calls puts deliveries past the "
                f"timeout: {_SEED1_FAILURE}.",
                "give the broker a consumer_timeout well above the slowest handler",
                queue,
            )
        ]
    return []


def adaptive_window_finding(concurrency: int, handler: float | None, timeout: float) -> Finding:
    """No prefetch given: what the worker's adaptive window does with these handlers."""
    budget = wait_budget(timeout)
    if handler is None:
        return Finding(
            "ok",
            "prefetch",
            f"prefetch adaptive (not set): starts at the concurrency {concurrency} and follows "
            f"the measured handler durations, up to {WINDOW_CAP}, so that no message waits "
            f"more than {seconds(budget)} unstarted",
        )
    window = AdaptiveWindow(concurrency, budget)
    window.observe(handler)
    return Finding(
        "ok",
        "prefetch",
        f"prefetch adaptive (not set): with handlers of {seconds(handler)}, the window settles "
        f"at {window.window} ({window.reason})",
    )


def configured_findings(
    prefetch: int, concurrency: int, handler: float | None, timeout: float
) -> list[Finding]:
    """The worker about to run with these settings, against ``timeout``."""
    findings = handler_findings(handler, timeout, None)
    if prefetch == 0:
        findings.append(unlimited_prefetch_finding(concurrency, handler, timeout))
    elif prefetch == concurrency:
        findings.append(
            Finding(
                "ok",
                "prefetch",
                f"prefetch {prefetch} = concurrency {concurrency}: no message waits unstarted "
                "in the worker",
            )
        )
    elif prefetch < concurrency:
        findings.append(
            Finding(
                "info",
                "prefetch",
                f"prefetch {prefetch} < concurrency {concurrency}: at most {prefetch} handlers "
                "ever run at once",
                fix="leave --prefetch unset (it defaults to the concurrency)",
            )
        )
    else:
        waves = math.ceil(prefetch / concurrency)
        if handler is None:
            findings.append(
                Finding(
                    "info",
                    "prefetch",
                    f"prefetch {prefetch} > concurrency {concurrency}: up to "
                    f"{prefetch - concurrency} messages wait unstarted in the worker",
                    "Give --handler-seconds to check how long they wait against the "
                    "consumer_timeout.",
                    "leave --prefetch unset (prefetch = concurrency)",
                )
            )
        elif waves * handler >= timeout / 2:
            worst = waves * handler
            findings.append(
                Finding(
                    "warning",
                    "prefetch-timeout",
                    f"prefetch {prefetch} with concurrency {concurrency} and handlers of "
                    f"{seconds(handler)}: the last prefetched message is acked only after "
                    f"~{seconds(worst)}, past half the consumer_timeout {seconds(timeout)}",
                    "steadyrabbit returns a message that waited half the consumer_timeout "
                    "unstarted to the queue, so the broker does not close the channel, but "
                    "those messages go round and round (requeued, delivered, aged again). "
                    "Any consumer without that safety net would hit the timeout: "
                    f"{_SEED1_FAILURE}.",
                    "leave --prefetch unset (prefetch = concurrency)",
                )
            )
        else:
            findings.append(
                Finding(
                    "info",
                    "prefetch",
                    f"prefetch {prefetch} > concurrency {concurrency}: a prefetched message "
                    f"waits up to ~{seconds((waves - 1) * handler)} unstarted, within the "
                    f"consumer_timeout {seconds(timeout)}",
                )
            )
    return findings


def unlimited_prefetch_finding(concurrency: int, handler: float | None, timeout: float) -> Finding:
    """--prefetch 0: seed 1's own setting, described (a steadyrabbit worker refuses it)."""
    fix = (
        "set the consumer's prefetch to its concurrency (a steadyrabbit worker does so when "
        "--prefetch is unset, and never runs with 0)"
    )
    if handler is None:
        return Finding(
            "warning",
            "prefetch-timeout",
            "prefetch 0 (unlimited): the broker pushes the whole backlog into the consumer",
            f"Once backlog {TIMES} handler duration reaches the consumer_timeout of "
            f"{seconds(timeout)}, {_SEED1_FAILURE}. Give --handler-seconds to know how "
            "large a backlog that takes.",
            fix,
        )
    backlog = max(1, math.floor(timeout / handler) * concurrency)
    return Finding(
        "critical",
        "prefetch-timeout",
        f"prefetch 0 (unlimited) with handlers of {seconds(handler)}: a backlog above "
        f"{plural(backlog, 'message')} times out",
        f"The broker pushes the whole backlog into the consumer. With handlers of "
        f"{seconds(handler)}, {concurrency} at a time, any backlog above {backlog} messages "
        f"leaves a prefetched message waiting past the consumer_timeout of "
        f"{seconds(timeout)}: {_SEED1_FAILURE}.",
        fix,
    )


def live_consumer_findings(
    queue: QueueReport, concurrency: int, handler: float | None
) -> list[Finding]:
    if queue.consumers is None or queue.consumer_timeout is None:
        return []
    timeout = queue.consumer_timeout
    name = queue.name
    findings: list[Finding] = []
    unlimited: list[str] = []
    too_deep: list[tuple[str, int, float]] = []
    auto_ack: list[str] = []
    no_heartbeat: list[str] = []
    for consumer in queue.consumers:
        if consumer.heartbeat == 0:
            no_heartbeat.append(consumer.label)
        if not consumer.ack_required:
            auto_ack.append(consumer.label)
            continue
        if consumer.is_steadyrabbit:
            continue  # returns aged prefetched messages itself (invariant 2)
        limit = consumer.effective_prefetch
        if limit == 0:
            unlimited.append(consumer.label)
        elif handler is not None:
            parallel = min(limit, concurrency)
            worst = math.ceil(limit / parallel) * handler
            if worst >= timeout:
                too_deep.append((consumer.label, limit, worst))
    fix = (
        f"set prefetch = concurrency on those consumers (basic_qos(prefetch_count="
        f"{concurrency})), or consume {name} with steadyrabbit"
    )
    if unlimited:
        count = plural(len(unlimited), "consumer")
        if handler is not None:
            backlog = max(1, math.floor(timeout / handler) * concurrency)
            findings.append(
                Finding(
                    "critical",
                    "prefetch-timeout",
                    f"queue {name}: {count} with unlimited prefetch: prefetch {TIMES} handler "
                    f"duration ≥ consumer_timeout",
                    f"{_names(unlimited)}: with prefetch 0 the broker pushes the whole backlog "
                    f"into the consumer. With handlers of {seconds(handler)}, "
                    f"{concurrency} at a time, any backlog above {backlog} messages leaves a "
                    f"prefetched message waiting past the consumer_timeout of "
                    f"{seconds(timeout)}: {_SEED1_FAILURE}.",
                    fix,
                    name,
                )
            )
        else:
            findings.append(
                Finding(
                    "warning",
                    "prefetch-timeout",
                    f"queue {name}: {count} with unlimited prefetch",
                    f"{_names(unlimited)}: with prefetch 0 the broker pushes the whole backlog "
                    f"into the consumer; once backlog {TIMES} handler duration reaches the "
                    f"consumer_timeout of {seconds(timeout)}, {_SEED1_FAILURE}. Give "
                    "--handler-seconds to know how close it is.",
                    fix,
                    name,
                )
            )
    for line, limit, worst in too_deep:
        findings.append(
            Finding(
                "critical",
                "prefetch-timeout",
                f"queue {name}: consumer prefetch {limit} {TIMES} handler duration ≥ "
                "consumer_timeout",
                f"{line}: assuming it runs {plural(min(limit, concurrency), 'handler')} of "
                f"{seconds(handler or 0)} at a time, its last prefetched message is acked "
                f"after ~{seconds(worst)}, past the consumer_timeout of {seconds(timeout)}: "
                f"{_SEED1_FAILURE}.",
                fix,
                name,
            )
        )
    if no_heartbeat:
        findings.append(
            Finding(
                "warning",
                "consumer-heartbeat",
                f"queue {name}: {plural(len(no_heartbeat), 'consumer')} with heartbeats off",
                f"{_names(no_heartbeat)}: {_NO_HEARTBEAT_DETECTION}.",
                f"give those clients a heartbeat of {HEARTBEAT_MIN}-{HEARTBEAT_MAX} s",
                name,
            )
        )
    if auto_ack:
        findings.append(
            Finding(
                "info",
                "auto-ack",
                f"queue {name}: {plural(len(auto_ack), 'consumer')} with automatic "
                "acknowledgement",
                f"{_names(auto_ack)}: whatever was pushed to them is lost if they crash, and "
                "nothing limits how much that is.",
                "consume with manual acknowledgements (steadyrabbit does)",
                name,
            )
        )
    return findings


def queue_findings(
    queue: QueueReport,
    version: tuple[int, ...] | None,
    concurrency: int,
    handler: float | None,
    global_timeout: float,
    dlx_exists: bool | None,
) -> list[Finding]:
    name = queue.name
    if not queue.exists:
        return [
            Finding(
                "info",
                "queue",
                f"queue {name} does not exist (or may not be read)",
                "A steadyrabbit worker declares it durable, with no arguments, and its "
                f"{queue.dead_letter_queue}.",
                queue=name,
            )
        ]
    findings: list[Finding] = []
    consumers = queue.consumer_count or 0
    summary = f"{plural(queue.messages_ready or 0, 'message')} ready"
    if queue.messages_unacknowledged is not None:
        summary += f", {queue.messages_unacknowledged} unacked"
    summary += f", {plural(consumers, 'consumer')}"
    kind = f" ({queue.type})" if queue.type else ""
    findings.append(Finding("ok", "queue", f"queue {name}{kind}: {summary}", queue=name))

    # Dead-letter route.
    if queue.dead_letter_queue_exists:
        waiting = queue.dead_letter_messages or 0
        findings.append(
            Finding(
                "info" if waiting else "ok",
                "dead-letter",
                f"queue {name}: failures go to {queue.dead_letter_queue}"
                + (f", which holds {plural(waiting, 'message')}" if waiting else ""),
                fix=f"steadyrabbit dlq list {name}" if waiting else "",
                queue=name,
            )
        )
    elif queue.dead_letter_exchange is not None:
        shown = queue.dead_letter_exchange or "(the default exchange)"
        if dlx_exists is False:
            findings.append(
                Finding(
                    "warning",
                    "dead-letter",
                    f"queue {name}: its dead-letter exchange {shown} does not exist",
                    "Messages dead-lettered to a missing exchange are dropped.",
                    f"declare the exchange {shown} and bind a queue to it",
                    name,
                )
            )
        else:
            findings.append(
                Finding(
                    "ok",
                    "dead-letter",
                    f"queue {name}: dead-letters to exchange {shown}",
                    queue=name,
                )
            )
    else:
        unknown = queue.arguments is None
        findings.append(
            Finding(
                "warning",
                "dead-letter",
                f"queue {name}: no dead-letter route (no {queue.dead_letter_queue}"
                + (")" if unknown else ", no x-dead-letter-exchange)"),
                "A message its consumer cannot process either loops (nack with requeue, "
                "redelivered at once, again and again) or is lost (nack without requeue)."
                + (
                    " Without the management API the queue's arguments (a dead-letter "
                    "exchange) could not be seen."
                    if unknown
                    else ""
                ),
                f"consume it with steadyrabbit (which declares {queue.dead_letter_queue}), or "
                "give it a dead-letter exchange (x-dead-letter-exchange or a policy)",
                name,
            )
        )
    if queue.retry_queues:
        listing = ", ".join(
            f"{retry.name} ({retry.messages if retry.messages is not None else '?'})"
            for retry in queue.retry_queues
        )
        findings.append(Finding("ok", "retry", f"queue {name}: retry queues {listing}", queue=name))

    # x-consumer-timeout before 3.12 (queue argument, policy or consumer argument).
    ignored = version is not None and version < CONSUMER_TIMEOUT_ARGUMENT_SINCE
    if ignored:
        places: list[str] = []
        arguments = queue.arguments or {}
        policy = queue.effective_policy or {}
        if "x-consumer-timeout" in arguments:
            places.append(f"queue argument x-consumer-timeout = {arguments['x-consumer-timeout']}")
        if "consumer-timeout" in policy:
            places.append(f"policy {queue.policy} consumer-timeout = {policy['consumer-timeout']}")
        with_argument = [
            c.label for c in queue.consumers or () if "x-consumer-timeout" in c.arguments
        ]
        if with_argument:
            places.append(f"consumer argument x-consumer-timeout on {_names(with_argument)}")
        if places:
            findings.append(
                Finding(
                    "warning",
                    "consumer-timeout-argument",
                    f"queue {name}: x-consumer-timeout is ignored by this broker (before "
                    "RabbitMQ 3.12)",
                    f"{'; '.join(places)}: accepted and silently ignored; the global "
                    f"consumer_timeout ({seconds(global_timeout)} configured here) applies.",
                    "set consumer_timeout in rabbitmq.conf (global), or upgrade to 3.12+",
                    name,
                )
            )

    # Measured: how long deliveries stay unacked (Little's law: unacked / ack rate).
    unacked = queue.messages_unacknowledged or 0
    timeout = queue.consumer_timeout or global_timeout
    if unacked and queue.ack_rate:
        held = unacked / queue.ack_rate
        if held >= timeout / 2:
            findings.append(
                Finding(
                    "critical" if held >= timeout else "warning",
                    "measured-unacked",
                    f"queue {name}: deliveries stay unacked ~{seconds(round(held, 1))} on "
                    f"average (measured), against a consumer_timeout of {seconds(timeout)}",
                    f"{unacked} unacked, acked at {queue.ack_rate:g}/s: each delivery waits in "
                    f"its consumer about {seconds(round(held, 1))}. Past the timeout, "
                    f"{_SEED1_FAILURE}.",
                    "lower the consumers' prefetch to their concurrency",
                    name,
                )
            )
    if queue.redeliver_rate and consumers:
        findings.append(
            Finding(
                "info",
                "redeliveries",
                f"queue {name}: messages are being redelivered ({queue.redeliver_rate:g}/s)",
                "Redeliveries follow a channel or connection closed with messages unacked "
                "(consumer_timeout, missed heartbeats, a crash) or a nack with requeue.",
                queue=name,
            )
        )
    if queue.consumer_timeout is not None and queue.consumer_timeout != global_timeout:
        findings += handler_findings(handler, queue.consumer_timeout, name)
    findings.extend(live_consumer_findings(queue, concurrency, handler))
    return findings


def alarm_findings(
    alarms: tuple[str, ...] | None,
    blocked: tuple[str, ...] | None,
    blocking: tuple[str, ...] | None,
) -> list[Finding]:
    findings: list[Finding] = []
    if alarms:
        waiting = (
            f" {plural(len(blocking), 'more connection')} will be blocked as soon as they publish."
            if blocking
            else ""
        )
        findings.append(
            Finding(
                "critical",
                "alarms",
                f"resource alarm: {_names(alarms)}",
                "While an alarm is on, the broker stops reading every connection that "
                "publishes: publishers hang, and a client that publishes and acks on the same "
                f"connection stops acking too, until its deliveries time out.{waiting}",
                "free memory or disk on the broker (or review vm_memory_high_watermark and "
                "disk_free_limit), and publish on a connection apart from the consumers'",
            )
        )
    elif alarms is not None:
        findings.append(Finding("ok", "alarms", "no memory or disk alarm"))
    if blocked:
        findings.append(
            Finding(
                "critical",
                "blocked-connections",
                f"{plural(len(blocked), 'connection')} blocked by the broker",
                f"{_names(blocked)}: the broker does not read them until the alarm clears; "
                "acks sent on them wait too.",
                "clear the broker's alarm, and publish on a connection apart from the consumers'",
            )
        )
    elif blocked is not None:
        findings.append(Finding("ok", "blocked-connections", "no blocked connections"))
    return findings


# -- the cluster, and where queues live ----------------------------------------------------------


def cluster_findings(nodes: Sequence[NodeReport] | None) -> list[Finding]:
    """The cluster's members: every one running, none partitioned. A single node says so and
    nothing more; None (no management API) is not judged, the report lists it as not checked."""
    if nodes is None:
        return []
    if len(nodes) == 1:
        return [
            Finding(
                "ok",
                "cluster",
                f"single node {nodes[0].name}: no cluster members or queue replicas to check",
            )
        ]
    findings: list[Finding] = []
    split = _partitions(nodes)
    if split:
        findings.append(
            Finding(
                "critical",
                "cluster-partition",
                f"network partition between cluster nodes: {_names(split)}",
                "Each side goes on alone: classic queues and their messages diverge, quorum "
                "queues run only where a majority of their members is, and with the default "
                "partition handling (ignore) the cluster does not heal by itself.",
                "restore the network, then restart the nodes of the smaller side (rabbitmqctl "
                "stop_app, then start_app) so that they rejoin; cluster_partition_handling = "
                "pause_minority keeps it from happening again",
            )
        )
    stopped = [node.name for node in nodes if not node.running]
    if stopped:
        running = len(nodes) - len(stopped)
        # A majority of members running keeps quorum queues going (a warning: nothing stops
        # yet, but the margin is gone); without one, they stop (critical).
        majority = running * 2 > len(nodes)
        shown = f"{running} of {len(nodes)} running"
        title = (
            f"cluster node {stopped[0]} is not running ({shown})"
            if len(stopped) == 1
            else f"cluster nodes {_names(stopped)} are not running ({shown})"
        )
        if majority:
            detail = (
                "A warning rather than critical because the running nodes are a majority: "
                "quorum queues go on with the members they have there. But classic queues on "
                "a stopped node are unavailable until it returns, and one more node lost can "
                "leave quorum queues without a majority of members, and then they stop."
            )
        else:
            detail = (
                "Critical because the running nodes are not a majority: quorum queues with "
                "members on the stopped nodes have lost their majority and take and deliver "
                "nothing, and classic queues on those nodes are unavailable."
            )
        findings.append(
            Finding(
                "warning" if majority else "critical",
                "cluster-node",
                title,
                detail,
                "start it again (rabbitmqctl start_app, or the service, on that node), or "
                "remove a node gone for good with rabbitmqctl forget_cluster_node",
            )
        )
    if not findings:
        findings.append(
            Finding("ok", "cluster", f"cluster of {len(nodes)} nodes: all running, no partition")
        )
    return findings


def _partitions(nodes: Sequence[NodeReport]) -> list[str]:
    """``a | b`` for each pair of members that do not see each other, once (both sides list
    the other in their ``partitions``)."""
    pairs: list[str] = []
    seen: set[frozenset[str]] = set()
    for node in nodes:
        for other in node.partitions:
            pair = frozenset((node.name, other))
            if pair not in seen:
                seen.add(pair)
                pairs.append(f"{node.name} | {other}")
    return pairs


def replica_findings(
    queue: QueueReport, nodes: Sequence[NodeReport] | None, version: tuple[int, ...] | None
) -> list[Finding]:
    """Where ``queue`` and its dead-letter and retry queues live, on a cluster of two nodes or
    more: a classic queue on one node only, a quorum queue short of members or with members
    offline. Nothing on a single node, or when the placements or the members are not known."""
    if nodes is None or len(nodes) < 2 or not queue.placements:
        return []
    running = {node.name for node in nodes if node.running}
    name = queue.name
    findings: list[Finding] = []
    single: list[str] = []
    replicated: list[str] = []
    for placement in queue.placements:
        if placement.members is not None:  # a quorum queue or a stream: Raft members
            problems = _member_findings(name, placement, running)
            findings += problems
            if not problems:
                replicated.append(
                    f"{placement.name} ({placement.type or 'quorum'}, "
                    f"{len(placement.members)} members online)"
                )
        elif placement.type == "classic":
            node = placement.node or "one node"
            mirrored = "ha-mode" in placement.effective_policy and (
                version is None or version < _MIRRORING_UNTIL
            )
            if placement.node is not None and placement.node not in running:
                findings.append(
                    Finding(
                        "critical",
                        "replicas",
                        f"queue {name}: {placement.name} is unavailable: its node {node} is "
                        "not running",
                        "A classic queue lives on one node only: until that node is back it "
                        "can be neither consumed nor published to, and its messages are lost "
                        "with that node's disk.",
                        f'start {node}; then move to quorum queues (queue_type="quorum"), '
                        "which keep a copy on several nodes",
                        name,
                    )
                )
            elif mirrored:
                findings.append(
                    Finding(
                        "info",
                        "replicas",
                        f"queue {name}: {placement.name} is a mirrored classic queue (policy "
                        f"{placement.policy}): mirroring is gone in RabbitMQ 4.0",
                        "It is replicated on this broker; after an upgrade to 4.0 the policy's "
                        f"ha-mode does nothing and it lives on {node} only.",
                        'move to quorum queues (queue_type="quorum") before upgrading',
                        name,
                    )
                )
            else:
                single.append(f"{placement.name} on {node}")
    if single:
        findings.append(
            Finding(
                "warning",
                "replicas",
                f"queue {name}: not replicated (classic, one node each): {_names(single)}",
                f"On this cluster of {len(nodes)} nodes a classic queue still lives on one "
                "node: while that node is down the queue and its messages are unavailable (a "
                "worker reconnects to another node and finds nothing to consume), and they "
                "are lost with its disk.",
                "use quorum queues, which keep a copy on several nodes: a queue's type cannot "
                'change, so drain these and declare them anew with queue_type="quorum" '
                "(--queue-type quorum)",
                name,
            )
        )
    if replicated and not findings:
        findings.append(
            Finding("ok", "replicas", f"queue {name}: replicated: {_names(replicated)}", queue=name)
        )
    return findings


def _member_findings(
    family: str, placement: PlacementReport, running_nodes: set[str]
) -> list[Finding]:
    """A quorum queue's members: a majority online, none offline, as many as it needs."""
    members = placement.members or ()
    # A member on a node that is not running counts as offline whatever ``online`` says: after
    # ``rabbitmqctl stop_app`` the node's Erlang VM still answers, and RabbitMQ 3.10 may list
    # the member online for a while although it serves nothing.
    online = set(placement.online or ()) & running_nodes
    offline = [member for member in members if member not in online]
    running = len(running_nodes)
    up = len(members) - len(offline)
    label = f"{placement.type or 'quorum'} queue {placement.name}"
    count = f"{up} of {len(members)} members online"
    replace_member = (
        f"rabbitmq-queues delete_member {placement.name} <node>, then rabbitmq-queues "
        f"add_member {placement.name} <running node>"
    )
    if up * 2 <= len(members):
        return [
            Finding(
                "critical",
                "replicas",
                f"{label} has no majority: {count}",
                f"Offline: {_names(offline)}. A quorum queue takes and delivers messages only "
                "while a majority of its members is online: it is stopped until enough of "
                "them return.",
                f"start the nodes of its offline members; a node gone for good: {replace_member}",
                family,
            )
        ]
    findings: list[Finding] = []
    if offline:
        spare = up - (len(members) // 2 + 1)
        margin = (
            f"it survives {plural(spare, 'more member')} lost"
            if spare
            else "one more member lost stops it"
        )
        findings.append(
            Finding(
                "warning",
                "replicas",
                f"{label}: {count} (offline: {_names(offline)})",
                f"It goes on with the majority it has, but {margin}.",
                f"start the nodes of its offline members; a node gone for good: {replace_member}",
                family,
            )
        )
    if len(members) < running:
        grow = (
            f"add members on the nodes without one: rabbitmq-queues add_member "
            f"{placement.name} <node> (or rabbitmq-queues grow <node> all)"
        )
        if len(members) < _QUORUM_MIN_MEMBERS:
            findings.append(
                Finding(
                    "warning",
                    "replicas",
                    f"{label} has {plural(len(members), 'member')} on a cluster of {running} "
                    "running nodes: losing one stops it",
                    "A quorum queue needs a majority of its members online, and one or two "
                    "members have no spare (it was declared while the cluster was smaller, or "
                    "with a small x-quorum-initial-group-size).",
                    grow,
                    family,
                )
            )
        else:
            findings.append(
                Finding(
                    "info",
                    "replicas",
                    f"{label} has {len(members)} members on a cluster of {running} running nodes",
                    f"It survives {plural((len(members) - 1) // 2, 'member')} lost; the other "
                    "nodes hold no copy of it.",
                    f"if every node should hold one, {grow}",
                    family,
                )
            )
    return findings


def delivery_limit(
    arguments: Mapping[str, Any],
    policy: Mapping[str, Any],
    version: tuple[int, ...] | None,
    reported: int | str | None = None,
) -> tuple[int | None, str]:
    """The delivery limit of a quorum queue with these arguments and effective policy on a
    broker of ``version``, and where it comes from; None: no limit (or not known).

    ``reported``: what the broker itself says, when it does (a number, or "unlimited").
    """
    if isinstance(reported, int) and not isinstance(reported, bool):
        return (reported if reported >= 0 else None), "reported by the broker"
    if reported == "unlimited":
        return None, "reported by the broker"
    argument = _integer(arguments.get("x-delivery-limit"))
    from_policy = _integer(policy.get("delivery-limit"))
    if argument is not None and from_policy is not None:
        # As RabbitMQ resolves them: the lower one, unless either is negative (4.x's -1, no
        # limit), in which case the higher one.
        value = (
            max(argument, from_policy) if min(argument, from_policy) < 0
            else min(argument, from_policy)
        )
        source = "queue argument x-delivery-limit and policy delivery-limit"
    elif argument is not None:
        value, source = argument, "queue argument x-delivery-limit"
    elif from_policy is not None:
        value, source = from_policy, "policy delivery-limit"
    elif version is not None and version >= DEFAULT_DELIVERY_LIMIT_SINCE:
        value, source = DEFAULT_DELIVERY_LIMIT, "RabbitMQ 4's default for quorum queues"
    else:
        return None, "none"
    return (value if value >= 0 else None), source


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def delivery_limit_findings(queue: QueueReport, version: tuple[int, ...] | None) -> list[Finding]:
    """A quorum queue of ``queue``'s family that drops a message delivered more than its
    delivery limit times, for want of a dead-letter route: on 4.x every quorum queue has one
    (20 by default); before, only one that sets it."""
    findings: list[Finding] = []
    for placement in queue.placements or ():
        if placement.type != "quorum":
            continue
        policy = placement.effective_policy
        if "x-dead-letter-exchange" in placement.arguments or "dead-letter-exchange" in policy:
            continue
        limit, source = delivery_limit(
            placement.arguments, policy, version, placement.delivery_limit
        )
        if limit is None:
            continue
        if placement.role == "dead-letter":
            why = (
                "Each steadyrabbit dlq list or dlq show takes its messages and gives them back, "
                "which the broker counts as a delivery before RabbitMQ 4.3, as it does a "
                "consumer that crashes or disconnects holding them."
            )
            fix = (
                f"give {placement.name} a dead-letter exchange of its own by policy "
                "(dead-letter-exchange), or raise its policy delivery-limit"
            )
        else:
            dlq = queue.dead_letter_queue
            why = (
                f"steadyrabbit counts a handler's failures itself and dead-letters by copy to "
                f"{dlq}, but deliveries it never settles count too: a worker that crashes or "
                "loses its connection holding the message (a crash loop before the crash guard "
                "counts it), a consumer_timeout, a requeue by another consumer."
            )
            policy_name = f" (merged into its policy {placement.policy}: one policy applies)"
            fix = (
                f"add a dead-letter route to {dlq} by policy: rabbitmqctl set_policy "
                f"{placement.name}-dlx '^{re.escape(placement.name)}$' "
                f"'{{\"dead-letter-exchange\":\"\",\"dead-letter-routing-key\":\"{dlq}\"}}' "
                "--apply-to queues"
                + (policy_name if placement.policy else "")
            )
        findings.append(
            Finding(
                "warning",
                "delivery-limit",
                f"quorum queue {placement.name}: a message delivered more than {limit} times is "
                "dropped: no dead-letter route",
                f"delivery-limit {limit} ({source}); past it the broker drops the message "
                f"without a trace. {why}",
                fix,
                queue.name,
            )
        )
    return findings
