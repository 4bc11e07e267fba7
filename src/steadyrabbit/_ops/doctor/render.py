"""doctor's report as people read it: a checklist, one marker per finding, fixes beneath.

URLs are masked once more on the way out, and a terminal that cannot print the markers gets
ASCII ones (see :func:`can_encode`).
"""

from __future__ import annotations

from typing import Any

from ..._url import mask_url
from .report import TIMES, DoctorReport, PlacementReport, plural, seconds

__all__ = ["can_encode", "format_report"]

_MARKERS = {"ok": "✓", "info": "i", "warning": "!", "critical": "✗"}
_ASCII_MARKERS = {"ok": "+", "info": "i", "warning": "!", "critical": "x"}


def format_report(report: DoctorReport, *, unicode: bool = True) -> str:
    """The report as a readable checklist."""
    markers = _MARKERS if unicode else _ASCII_MARKERS
    server = report.server
    lines = [f"steadyrabbit doctor: {report.broker}"]
    product = " ".join(part for part in (server.product, server.version) if part)
    where = ", ".join(
        part
        for part in (
            f"on {server.platform}" if server.platform else "",
            f"cluster {server.cluster_name}" if server.cluster_name else "",
        )
        if part
    )
    lines.append(f"  server: {product or 'unknown'}" + (f" ({where})" if where else ""))
    capabilities = sorted(name for name, on in server.capabilities.items() if on)
    if capabilities:
        lines.extend(_wrap(f"capabilities: {', '.join(capabilities)}", "  ", "    "))
    handler = (
        seconds(report.handler_seconds) if report.handler_seconds is not None else "not given"
    )
    prefetch = "unlimited (0)" if report.prefetch == 0 else str(report.prefetch)
    line = (
        f"worker settings: heartbeat {report.heartbeat_requested} s, prefetch "
        f"{prefetch}, concurrency {report.concurrency}, handler {handler}, "
        f"consumer_timeout {seconds(report.consumer_timeout)}"
    )
    lines.extend(_wrap(line, "  ", "    "))
    clustered = report.nodes is not None and len(report.nodes) > 1
    if report.nodes is not None:
        members = ", ".join(
            node.name + ("" if node.running else " (not running)") for node in report.nodes
        )
        line = f"cluster: {plural(len(report.nodes), 'node')}: {members}"
        lines.extend(_wrap(line, "  ", "    "))
    for queue in report.queues:
        if not queue.exists:
            continue
        if clustered and queue.placements:
            running = {node.name for node in report.nodes or () if node.running}
            where = "; ".join(_placement(placement, running) for placement in queue.placements)
            lines.extend(_wrap(f"queue {queue.name} replicas: {where}", "  ", "    "))
        if queue.arguments:
            line = f"queue {queue.name} arguments: {_arguments(queue.arguments)}"
            lines.extend(_wrap(line, "  ", "    "))
        if queue.policy:
            lines.append(f"  queue {queue.name} policy: {queue.policy}")
        for consumer in queue.consumers or ():
            limit = consumer.effective_prefetch
            prefetch = "unlimited" if limit == 0 else str(limit)
            ack = "manual ack" if consumer.ack_required else "auto ack"
            heartbeat = ""
            if consumer.heartbeat == 0:
                heartbeat = ", heartbeats off"
            elif consumer.heartbeat is not None:
                heartbeat = f", heartbeat {consumer.heartbeat} s"
            line = (
                f"queue {queue.name} consumer {consumer.label}: prefetch {prefetch}, "
                f"{ack}{heartbeat}"
            )
            lines.extend(_wrap(line, "  ", "    "))
    lines.append("")
    for finding in report.findings:
        lines.append(f"{markers[finding.level]} {finding.title}")
        if finding.level != "ok":
            lines.extend(_wrap(finding.detail, "    "))
            lines.extend(_wrap(f"fix: {finding.fix}" if finding.fix else "", "    ", "         "))
    if report.not_checked:
        lines.append("")
        lines.append("not checked:")
        for item in report.not_checked:
            lines.extend(_wrap(f"- {item}", "  ", "    "))
    lines.append("")
    counts = [
        plural(report.count("critical"), "critical finding"),
        plural(report.count("warning"), "warning"),
    ]
    lines.append(", ".join(counts))
    text = mask_url("\n".join(lines))
    if not unicode:
        text = text.replace("≥", ">=").replace(TIMES, "x")
    return text


def can_encode(stream: Any, text: str = "✓✗≥" + TIMES) -> bool:
    """Whether ``stream`` can print ``text`` (the checklist's markers and signs)."""
    encoding = getattr(stream, "encoding", None) or "ascii"
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _placement(placement: PlacementReport, running: set[str]) -> str:
    """``jobs quorum, leader a, members a, b, c (offline c)`` or ``jobs.dlq classic on b``; a
    member on a node that is not running is offline, as the rules count it."""
    kind = placement.type or "?"
    if placement.members is None:
        return f"{placement.name} {kind} on {placement.node or '?'}"
    online = set(placement.online or ()) & running
    offline = [member for member in placement.members if member not in online]
    text = f"{placement.name} {kind}, leader {placement.leader or 'none'}, members "
    text += ", ".join(placement.members) or "none"
    return text + (f" (offline {', '.join(offline)})" if offline else "")


def _arguments(arguments: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in sorted(arguments.items()))


def _wrap(text: str, indent: str, then: str | None = None, width: int = 96) -> list[str]:
    """``text`` in lines of at most ``width``; the first indented by ``indent``, the rest by
    ``then`` (default: the same)."""
    lines: list[str] = []
    current = indent
    for word in text.split():
        if len(current) + len(word) + 1 > width and current.strip():
            lines.append(current.rstrip())
            current = indent if then is None else then
        current += word + " "
    if current.strip():
        lines.append(current.rstrip())
    return lines
