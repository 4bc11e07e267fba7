"""Alerts: e-mail and/or a webhook on dead letters, repeated reconnects, stuck handlers and
channels closed by the broker's consumer_timeout.

Events are recorded on the event loop for the price of a dict update; one task per worker
groups them (kind, queue or connection, error type), waits ``group_wait`` so that a burst ends
up in one notification, then mutes each notified group for ``repeat_interval`` and reports what
happened meanwhile in one follow-up. A notification names the queue, the error and the start of
the first message body; broker, SMTP and webhook credentials never appear in it or in the log.

A notification that cannot be delivered is logged in one line and dropped (no retry): the
groups in it stay muted, so a dead mail server costs one attempt per ``repeat_interval`` and
group, never a loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import smtplib
import socket
import ssl
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from time import monotonic, time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ._alert_book import (
    CONSUMER_TIMEOUT,
    DEAD_LETTERED,
    LOOP_BLOCKED,
    RECONNECTS,
    STUCK,
    AlertBook,
    AlertEvent,
    GroupReport,
    ReconnectCounter,
)
from ._alert_settings import AlertSettings, webhook_display
from ._decision import Decision, Outcome
from ._errors import ChannelClosedError, SteadyRabbitError, is_consumer_timeout
from ._middleware import Middleware
from ._preview import body_preview
from ._url import scrub, url_secrets

if TYPE_CHECKING:
    from ._message import Message
    from ._settings import Settings
    from ._view import ConsumerView, WorkerView

log = logging.getLogger("steadyrabbit")

_SEND_TIMEOUT = 10.0
# On worker stop, pending groups are sent within this many seconds or dropped.
_CLOSE_TIMEOUT = 5.0
_MAX_ERROR_CHARS = 500


# -- the alerter: one task per worker -----------------------------------------------------------


class Alerter(Middleware):
    """Records events on the event loop and sends the notifications from one task; a
    middleware, so the worker's core knows nothing of it.

    :meth:`start` and :meth:`aclose` run from ``on_worker_start``/``on_worker_stop``;
    ``record``, ``dead_lettered`` and ``reconnected`` are cheap, synchronous and never raise
    into their caller.
    """

    def __init__(
        self,
        alerts: AlertSettings,
        settings: Settings,
        *,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        self.alerts = alerts
        self._settings = settings
        self._clock = clock
        self._book = AlertBook(alerts.group_wait, alerts.repeat_interval)
        self._reconnects: dict[str, ReconnectCounter] = {}
        self._stuck_after = (
            alerts.stuck_after
            if alerts.stuck_after is not None
            else settings.consumer_timeout / 2
        )
        self._consumers: list[ConsumerView] = []
        self._stuck_reported: set[Message] = set()
        self._next_stuck_check = math.inf
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._host = socket.gethostname()
        self._secrets = _secrets_of(alerts)
        self.sent = 0  # notifications delivered to at least one destination
        self.failed = 0  # delivery attempts that failed (per destination)

    # -- middleware hooks ----------------------------------------------------------------------

    async def on_worker_start(self, worker: WorkerView) -> None:
        for consumer in worker.consumers:
            self.watch(consumer)
        self.start()

    async def on_worker_stop(self, worker: WorkerView) -> None:
        await self.aclose()

    def on_settled(self, message: Message, decision: Decision) -> None:
        if decision.outcome is Outcome.DEAD_LETTER:
            self.dead_lettered(
                message.queue, decision.error_type or "", decision.reason or "", message.body
            )

    def on_reconnecting(self, role: str, cause: str, error: Exception) -> None:
        self.reconnected(role, cause, str(error))

    def on_channel_lost(self, queue: str, error: Exception) -> None:
        if isinstance(error, ChannelClosedError) and is_consumer_timeout(error):
            self.consumer_timed_out(queue, error.reply_text)

    def on_loop_blocked(self, culprit: str, seconds: float) -> None:
        self.loop_blocked(culprit, seconds)

    # -- events (on the event loop) ----------------------------------------------------------

    def record(self, event: AlertEvent, weight: int = 1, since: float | None = None) -> None:
        try:
            self._book.add(event, self._clock(), time(), weight, since)
            self._wake.set()
        except Exception:
            # An alerting bug must never fail the message or the reconnect that reported it.
            log.exception("could not record an alert")

    def dead_lettered(
        self, queue: str, error_type: str, reason: str, body: bytes
    ) -> None:
        self.record(AlertEvent(DEAD_LETTERED, error_type, reason, queue=queue, body=body))

    def reconnected(self, role: str, cause: str, reason: str) -> None:
        counter = self._reconnects.get(role)
        if counter is None:
            counter = self._reconnects[role] = ReconnectCounter(self.alerts.reconnect_window)
        now = self._clock()
        recent = counter.add(now)
        threshold = self.alerts.reconnect_threshold
        if recent == threshold:
            # The event that crosses the threshold stands for every reconnect that led to it.
            self.record(
                AlertEvent(RECONNECTS, cause, reason, connection=role),
                weight=threshold,
                since=time() - (now - counter.oldest),
            )
        elif recent > threshold:
            self.record(AlertEvent(RECONNECTS, cause, reason, connection=role))

    def consumer_timed_out(self, queue: str, reason: str) -> None:
        """The broker closed the channel of ``queue``'s consumer: a delivery outlived its
        consumer_timeout (seed 1's failure; the message is redelivered, maybe handled twice)."""
        self.record(AlertEvent(CONSUMER_TIMEOUT, "PRECONDITION_FAILED", reason, queue=queue))

    def loop_blocked(self, culprit: str, seconds: float) -> None:
        """The watchdog saw the event loop blocked (heartbeats stalled) by ``culprit``; called
        once the loop turns again."""
        self.record(
            AlertEvent(
                LOOP_BLOCKED,
                culprit.partition(" (")[0],  # group by the code, not the line it was on
                f"the event loop was blocked for at least {seconds:.1f} s by {culprit}: "
                "heartbeats and acks stalled meanwhile",
                connection="event loop",
            )
        )

    def watch(self, consumer: ConsumerView) -> None:
        """Report this consumer's handlers that run longer than ``stuck_after``."""
        consumer.track_running()
        self._consumers.append(consumer)
        self._next_stuck_check = self._clock() + self._stuck_after

    # -- the task ------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="alerter")
        self._task.add_done_callback(_log_crash)

    async def aclose(self) -> None:
        """Send what is pending (within a few seconds), then stop the task."""
        task = self._task
        if task is None:
            return
        self._closing = True
        self._wake.set()
        _, late = await asyncio.wait({task}, timeout=_CLOSE_TIMEOUT)
        if late:
            log.warning("gave up sending pending alerts after %g s", _CLOSE_TIMEOUT)
            task.cancel()
            await asyncio.wait({task})

    async def _run(self) -> None:
        while not self._closing:
            self._wake.clear()
            now = self._clock()
            if now >= self._next_stuck_check:
                self._check_stuck(now)
            reports = self._book.take_due(now)
            if reports:
                await self._deliver(reports)
                continue
            due = min(self._book.next_due(), self._next_stuck_check)
            timeout = None if due == math.inf else max(0.0, due - now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
        reports = self._book.take_all(self._clock())
        if reports:
            await self._deliver(reports)

    def _check_stuck(self, now: float) -> None:
        """Record every handler that crossed ``stuck_after`` since the last check, and plan
        the next check for the earliest moment another one could."""
        limit = self._stuck_after
        next_check = now + limit
        running: set[Message] = set()
        for consumer in self._consumers:
            for message, started in consumer.running():
                running.add(message)
                if message in self._stuck_reported:
                    continue
                if started + limit <= now:
                    self._stuck_reported.add(message)
                    spec = consumer.spec
                    self.record(
                        AlertEvent(
                            STUCK,
                            spec.name,
                            f"handler {spec.name} has been running for {now - started:.0f} s "
                            f"(stuck_after {limit:g} s; at consumer_timeout "
                            f"{self._settings.consumer_timeout:g} s the broker closes "
                            "its channel)",
                            queue=spec.queue,
                            body=message.body,
                        )
                    )
                else:
                    next_check = min(next_check, started + limit)
        self._stuck_reported &= running
        self._next_stuck_check = next_check

    # -- sending ------------------------------------------------------------------------------

    async def _deliver(self, reports: list[GroupReport]) -> None:
        payload = self._payload(reports)
        sends: list[tuple[str, Any]] = []
        alerts = self.alerts
        if alerts.smtp is not None and alerts.email_from is not None:
            sends.append((f"e-mail via {alerts.smtp}", self._send_email(payload)))
        if alerts.webhook_url is not None:
            sends.append((f"webhook {webhook_display(alerts.webhook_url)}", self._post(payload)))
        # Every exception is caught per destination (return_exceptions): whatever breaks one
        # delivery (a refused login, a TLS error, a bug in a proxy) must neither stop the
        # other nor reach the worker.
        results = await asyncio.gather(*(coro for _, coro in sends), return_exceptions=True)
        delivered = False
        for (destination, _), result in zip(sends, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                self.failed += 1
                log.error(
                    "alert %s failed (%d group(s) dropped): %s",
                    destination,
                    len(reports),
                    self._scrub(f"{type(result).__name__}: {result}"),
                )
            else:
                delivered = True
        if delivered:
            self.sent += 1

    def _payload(self, reports: list[GroupReport]) -> dict[str, Any]:
        worker = {"name": self._settings.name, "host": self._host, "pid": os.getpid()}
        groups = [self._describe(report) for report in reports]
        return {
            "source": "steadyrabbit",
            "worker": worker,
            "sent_at": _iso(time()),
            "groups": groups,
            "text": self._summary(groups),
        }

    def _describe(self, report: GroupReport) -> dict[str, Any]:
        event = report.event
        error = self._scrub(event.error)
        if len(error) > _MAX_ERROR_CHARS:
            error = error[: _MAX_ERROR_CHARS - 3] + "..."
        return {
            "kind": event.kind,
            "queue": event.queue,
            "connection": event.connection,
            "error_type": event.error_type,
            "error": error,
            "count": report.count,
            "first_at": _iso(report.first_at),
            "last_at": _iso(report.last_at),
            "follow_up": report.follow_up,
            "body_preview": (
                None
                if event.body is None
                else self._scrub(body_preview(event.body, self.alerts.body_chars))
            ),
        }

    def _summary(self, groups: Iterable[dict[str, Any]]) -> str:
        lines = []
        for group in groups:
            where = _where(group)
            again = " more" if group["follow_up"] else ""
            what = {
                DEAD_LETTERED: "message(s) dead-lettered",
                RECONNECTS: "reconnect(s)",
                STUCK: "stuck handler(s)",
                CONSUMER_TIMEOUT: "channel(s) closed by the broker's consumer_timeout",
                LOOP_BLOCKED: "stall(s)",
            }.get(group["kind"], group["kind"])
            lines.append(f"{group['count']}{again} {what} on {where}: {group['error']}")
        return "\n".join(lines)

    def _subject(self, payload: dict[str, Any]) -> str:
        groups = payload["groups"]
        kinds = sorted({g["kind"] for g in groups})
        worker = payload["worker"]
        return (
            f"[steadyrabbit] {', '.join(kinds)} on {worker['name']}@{worker['host']}"
            f" ({len(groups)} group(s))"
        )

    async def _send_email(self, payload: dict[str, Any]) -> None:
        alerts = self.alerts
        message = EmailMessage()
        message["Subject"] = self._subject(payload)
        message["From"] = alerts.email_from
        message["To"] = ", ".join(alerts.email_to)
        # RFC 5322 requires Date; without it, spam filters score the mail and clients sort it
        # wherever they like.
        message["Date"] = formatdate(usegmt=True)
        message["Message-ID"] = make_msgid(domain=self._host or None)
        message.set_content(_email_text(payload))
        await asyncio.to_thread(self._send_email_blocking, message)

    def _send_email_blocking(self, message: EmailMessage) -> None:
        server = self.alerts.smtp
        assert server is not None
        client: smtplib.SMTP
        if server.scheme == "smtps":
            context = ssl.create_default_context()
            client = smtplib.SMTP_SSL(
                server.host, server.port, timeout=_SEND_TIMEOUT, context=context
            )
        else:
            client = smtplib.SMTP(server.host, server.port, timeout=_SEND_TIMEOUT)
        with client:
            if server.scheme == "smtp+starttls":
                client.starttls(context=ssl.create_default_context())
            if server.username is not None:
                client.login(server.username, server.password or "")
            client.send_message(message)

    async def _post(self, payload: dict[str, Any]) -> None:
        import httpx  # only workers that alert by webhook pay for the import

        url = self.alerts.webhook_url
        assert url is not None
        async with httpx.AsyncClient(timeout=_SEND_TIMEOUT) as client:
            response = await client.post(url, json=payload)
        if not response.is_success:
            # Not raise_for_status(): its message quotes the URL, secret and all.
            raise WebhookRefused(f"answered {response.status_code} {response.reason_phrase}")

    def _scrub(self, text: str) -> str:
        return scrub(text, self._secrets)


class WebhookRefused(SteadyRabbitError):
    """The webhook answered with a non-2xx status (internal: logged, never raised out)."""


def _secrets_of(alerts: AlertSettings) -> tuple[str, ...]:
    """Whatever of the alert settings must never appear in a notification or a log line."""
    secrets: list[str] = []
    if alerts.smtp is not None and alerts.smtp.password:
        secrets.append(alerts.smtp.password)
    if alerts.webhook_url is not None:
        url = alerts.webhook_url.strip()
        secrets += [url, *url_secrets(url)]
        with contextlib.suppress(ValueError):
            parts = urlsplit(url)
            # Slack and Teams put the secret in the path.
            if parts.path not in ("", "/"):
                secrets.append(parts.path)
            if parts.query:
                secrets.append(parts.query)
    return tuple(s for s in secrets if len(s) >= 4)


def _email_text(payload: dict[str, Any]) -> str:
    worker = payload["worker"]
    lines = [
        f"steadyrabbit worker {worker['name']} on {worker['host']} (pid {worker['pid']})",
        "",
    ]
    for group in payload["groups"]:
        where = _where(group)
        follow_up = " (more since the previous alert)" if group["follow_up"] else ""
        lines += [
            f"{group['kind']} on {where}{follow_up}",
            f"  count:  {group['count']}",
            f"  type:   {group['error_type']}",
            f"  error:  {group['error']}",
            f"  first:  {group['first_at']}",
            f"  last:   {group['last_at']}",
        ]
        if group["body_preview"] is not None:
            lines.append(f"  body:   {group['body_preview']}")
        lines.append("")
    return "\n".join(lines)


def _where(group: dict[str, Any]) -> str:
    """What a group happened to: a queue, a connection or the event loop."""
    if group["queue"] is not None:
        return f"queue {group['queue']!r}"
    if group["kind"] == LOOP_BLOCKED:
        return "the event loop"
    return f"the {group['connection']} connection"


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the alerter stopped; no more alerts", exc_info=task.exception())
