"""What a demo run did, and its closing summary: plain data and text, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DeadLetterInfo", "DemoResult", "format_summary"]


@dataclass(frozen=True)
class DeadLetterInfo:
    """One distinct message found in the dead-letter queue at the end."""

    message_id: str
    contract: int | None
    reason: str


@dataclass(frozen=True)
class DemoResult:
    """What happened to the backlog; every number comes from a real source.

    ``published``: messages the broker confirmed. ``delivered``: distinct messages the web
    service accepted (answered 2xx). ``retried``: copies the worker sent to a retry queue
    (``Stats.retried``). ``dead_lettered``: distinct messages in ``<queue>.dlq`` at the end
    (read back from the broker); ``dead_letters`` lists them with their reasons and ``poison``
    the ids the service was built to fail. ``reconnects``: connections the worker
    re-established (``Stats``; the consuming and the publishing connection each count).
    ``cuts``: times the demo reset the connections. ``stale_acks_dropped``: acks the worker
    dropped because the channel that delivered the message had died.
    ``duplicates_suppressed``: copies the worker acked without calling the service again
    (``Stats.duplicates``): redelivered after the reset, their first run had completed or was
    still going (idempotency, on by default). ``duplicates``: extra 2xx
    answers for messages the service had already accepted (at-least-once: a message whose ack
    died with the connection is delivered again), ``duplicated_messages`` how many messages
    they were. ``service_failures``: 5xx answers of the service (its flaky ones and the
    failing poison message's). ``left_in_queues``: messages still in the queue
    or its retry queues when the worker stopped. ``lost``: published messages neither accepted
    by the service, nor dead-lettered, nor still queued; must be 0. ``timed_out``: the demo gave
    up waiting for every message to settle. ``kept``: the queues were left on the broker.
    """

    queue: str
    dead_letter_queue: str
    published: int
    delivered: int
    retried: int
    dead_lettered: int
    reconnects: int
    cuts: int
    stale_acks_dropped: int
    duplicates: int
    duplicated_messages: int
    duplicates_suppressed: int
    left_in_queues: int
    lost: int
    elapsed: float
    timed_out: bool
    kept: bool
    service_failures: int = 0
    poison: tuple[str, ...] = ()
    dead_letters: tuple[DeadLetterInfo, ...] = ()
    events: tuple[str, ...] = field(default=(), repr=False)

    @property
    def ok(self) -> bool:
        """Every message accounted for, in time: the demo's exit status is 0 only then."""
        return self.lost == 0 and self.left_in_queues == 0 and not self.timed_out


def format_summary(result: DemoResult) -> str:
    """The closing report of a demo run, as lines of plain text."""
    r = result
    lines = [f"summary after {r.elapsed:.1f} s"]

    def row(label: str, value: int | str, note: str = "") -> None:
        lines.append(f"  {label:<21}{value!s:>6}   {note}".rstrip())

    row("published", r.published, "JSON contracts, each confirmed by the broker")
    row("delivered", r.delivered, "accepted (2xx) by the web service")
    row(
        "retried",
        r.retried,
        f"failed calls tried again via a retry queue (the service answered 5xx "
        f"{r.service_failures} times)",
    )
    row("dead-lettered", r.dead_lettered, f"in {r.dead_letter_queue}, each with its reason:")
    for letter in r.dead_letters:
        poison = " (poison)" if letter.message_id in r.poison else ""
        lines.append(f"{'':25}{letter.message_id}{poison}: {letter.reason}")
    row(
        "reconnects",
        r.reconnects,
        f"connections re-established after {r.cuts} reset(s) (the consuming and the publishing"
        " connection each count)",
    )
    row("stale acks", r.stale_acks_dropped, "dropped: their channel had died with the connection")
    row(
        "duplicates suppressed",
        r.duplicates_suppressed,
        "redelivered after the reset (their acks never reached the broker), acked without a "
        "second call: their first run had completed",
    )
    if r.duplicates:
        row(
            "duplicates",
            r.duplicates,
            f"{r.duplicated_messages} message(s) reached the service twice (with the same "
            "Idempotency-Key header)",
        )
    else:
        row("duplicates", 0, "no message reached the service twice")
    if r.left_in_queues:
        row("still queued", r.left_in_queues, "not settled when the demo stopped waiting")
    row("lost", r.lost)
    if r.ok:
        lines.append(
            f"OK: every message is accounted for: {r.delivered} delivered + {r.dead_lettered} "
            f"dead-lettered = {r.published} published."
        )
    else:
        why = "timed out waiting for every message to settle; " if r.timed_out else ""
        lines.append(
            f"FAILED: {why}{r.delivered} delivered + {r.dead_lettered} dead-lettered + "
            f"{r.left_in_queues} still queued of {r.published} published; lost {r.lost}."
        )
    if r.kept:
        lines.append(
            f"Left on the broker: {r.queue}, its retry queues and {r.dead_letter_queue}; look "
            f"with: steadyrabbit dlq list {r.queue}"
        )
    else:
        lines.append(
            "Removed the demo's queues and exchange from the broker (run with --keep, then "
            f"look with: steadyrabbit dlq list {r.queue})."
        )
    return "\n".join(lines) + "\n"
