"""Prometheus metrics and health checks over HTTP, served on the worker's own event loop.

``Settings(metrics_port=...)`` (``--metrics-port`` on the command line) makes the worker answer
``GET /metrics`` (Prometheus exposition by ``prometheus_client``), ``GET /healthz`` (200 while
the event loop turns: a blocked loop cannot answer at all) and ``GET /readyz`` (200 once
connected with every consumer registered, else 503 and the reason in one line), and the live
status: ``GET /status.json`` (one JSON document, see :mod:`steadyrabbit._status`; read by
``steadyrabbit top``) and ``GET /`` (a page that polls it and charts the throughput).

Nothing here runs per message except where it has to: the counters the worker keeps anyway
(:class:`Stats`) are read when scraped, by a custom collector; only the handler durations and
the messages being processed (for the age of the oldest unacked delivery) are recorded per
message, and only while metrics are on (its ``around_handler``). Each worker has its own
registry; importing this module registers nothing anywhere. Labels never carry a password: the
broker appears as its masked URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from time import monotonic, perf_counter, time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from ._errors import ConfigurationError
from ._measures import BrokerTraffic, Durations
from ._middleware import CallNext, Middleware
from ._status import (
    RECONNECT_CAUSES,
    build_status,
    leases_held,
    not_ready_reason,
    status_page,
)

if TYPE_CHECKING:
    from ._message import Message
    from ._view import ConsumerView, WorkerView

__all__ = ["Durations", "MetricsServer"]

log = logging.getLogger("steadyrabbit")

_MAX_REQUEST_HEAD = 8192
_REQUEST_TIMEOUT = 10.0
_PATHS = "/metrics, /healthz, /readyz, /status.json or / (the status page)"
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"
_HTML = "text/html; charset=utf-8"


class WorkerCollector(Collector):
    """Reads a worker's state when scraped; runs on the event loop's thread."""

    def __init__(
        self, worker: WorkerView, durations: dict[str, Durations], traffic: BrokerTraffic
    ) -> None:
        self._worker = worker
        self._durations = durations
        self._traffic = traffic

    def collect(self) -> Iterator[Metric]:
        worker = self._worker
        stats = worker.stats
        yield _counter(
            "messages_delivered", "Deliveries received from the broker.", stats.delivered
        )
        yield _counter(
            "messages_acked",
            "Acks sent: handled messages, and originals whose retry or dead-letter copy the "
            "broker confirmed.",
            stats.acked,
        )
        yield _counter(
            "messages_retried",
            "Messages sent to a retry queue (copy confirmed, original acked).",
            stats.retried,
        )
        yield _counter(
            "messages_dead_lettered",
            "Messages sent to their dead-letter queue <queue>.dlq (copy confirmed, original "
            "acked).",
            stats.dead_lettered,
        )
        yield _counter(
            "duplicates_suppressed",
            "Copies acked without running because that message had completed before (idempotency).",
            stats.duplicates,
        )
        yield _counter(
            "messages_handed_off",
            "Deliveries acked early while their handler ran on (a hand-off before "
            "consumer_timeout): a confirmed marker in the delay queue stands for the run.",
            stats.handed_off,
        )
        yield _counter(
            "markers_settled",
            "Hand-off markers settled without running (their run was over, or still alive and "
            "delayed again), and copies that became the marker of a run still going.",
            stats.markers,
        )
        yield _gauge(
            "leases_held",
            "Running handlers that hold a lease in the idempotency store (a message with a key, "
            "or a handed-off run).",
            leases_held(worker.consumers),
        )
        requeued = CounterMetricFamily(
            "steadyrabbit_messages_requeued",
            "Messages returned to their queue before their handler started: on shutdown "
            "(unstarted) or after waiting half of consumer_timeout in prefetch (aged).",
            labels=["reason"],
        )
        requeued.add_metric(["unstarted"], stats.requeued_unstarted)
        requeued.add_metric(["aged"], stats.requeued_aged)
        yield requeued
        yield _counter(
            "stale_acks_dropped",
            "Acks (and nacks) dropped because the channel that delivered the message had "
            "closed: the broker had requeued the message already.",
            stats.stale_settlements_dropped,
        )
        yield _counter(
            "handler_errors",
            "Handler calls that raised an exception other than Retry and Reject.",
            stats.handler_errors,
        )
        yield _counter(
            "channel_recoveries",
            "Consuming channels closed by the broker (e.g. consumer_timeout) and reopened.",
            stats.channel_recoveries,
        )
        yield _counter(
            "consumer_cancels",
            "Consumers cancelled by the broker (basic.cancel: queue deleted or moved) and "
            "restored.",
            stats.consumer_cancels,
        )
        reconnects = CounterMetricFamily(
            "steadyrabbit_reconnects",
            "Connections lost (then re-established with backoff), by cause.",
            labels=["cause"],
        )
        for cause in sorted({*RECONNECT_CAUSES, *stats.reconnects}):
            reconnects.add_metric([cause], stats.reconnects[cause])
        yield reconnects
        yield _counter(
            "event_loop_stalls",
            "Times the event loop was blocked past loop_lag_threshold (the blocking code is "
            "named in the log).",
            stats.loop_stalls,
        )
        yield from self._loop_lag()
        yield from self._connections()
        yield from self._consumers(worker.consumers)

    def _loop_lag(self) -> Iterator[Metric]:
        watchdog = self._worker.watchdog
        lag = GaugeMetricFamily(
            "steadyrabbit_event_loop_lag_seconds",
            "Event-loop lag in the watchdog's latest sample (a stalled loop answers no scrape: "
            "see the _max gauge and the stall counter).",
        )
        lag_max = GaugeMetricFamily(
            "steadyrabbit_event_loop_lag_max_seconds",
            "Largest event-loop lag the watchdog measured since the worker started.",
        )
        if watchdog is not None:
            lag.add_metric([], watchdog.lag)
            lag_max.add_metric([], max(0.0, watchdog.max_lag))
        yield lag
        yield lag_max

    def _connections(self) -> Iterator[Metric]:
        worker = self._worker
        connections = worker.connections
        self._traffic.look(connections)
        yield _gauge(
            "ready",
            "1 when connected with every consumer registered with the broker (as /readyz).",
            1 if worker.ready else 0,
        )
        connected = GaugeMetricFamily(
            "steadyrabbit_connected",
            "1 while the connection (consume or publish) is open.",
            labels=["connection"],
        )
        broker = GaugeMetricFamily(
            "steadyrabbit_broker_info",
            "The broker each open connection goes to (password masked).",
            labels=["connection", "broker"],
        )
        traffic = GaugeMetricFamily(
            "steadyrabbit_broker_traffic_age_seconds",
            "Seconds since bytes (heartbeats included) last came from the broker on the "
            "connection, as judged at each scrape or probe: under-reports by at most the time "
            "between two of them.",
            labels=["connection"],
        )
        for role, connection in connections.items():
            connected.add_metric([role], 0 if connection is None else 1)
            if connection is not None:
                broker.add_metric([role, connection.address.display], 1)
            age = self._traffic.age(role)
            if age is not None:
                traffic.add_metric([role], age)
        yield connected
        yield broker
        yield traffic

    def _consumers(self, consumers: Iterable[ConsumerView]) -> Iterator[Metric]:
        now = monotonic()
        running = GaugeMetricFamily(
            "steadyrabbit_in_flight_messages",
            "Messages whose handler is running.",
            labels=["queue"],
        )
        waiting = GaugeMetricFamily(
            "steadyrabbit_prefetched_messages",
            "Prefetched messages waiting for a free handler slot.",
            labels=["queue"],
        )
        oldest = GaugeMetricFamily(
            "steadyrabbit_oldest_unacked_age_seconds",
            "Age of the oldest delivery not settled yet (0 if none); the broker closes the "
            "channel when it reaches steadyrabbit_consumer_timeout_seconds.",
            labels=["queue"],
        )
        ready = GaugeMetricFamily(
            "steadyrabbit_consumer_ready",
            "1 while the consumer is registered with the broker.",
            labels=["queue"],
        )
        outcomes = CounterMetricFamily(
            "steadyrabbit_queue_messages",
            "Messages settled per queue, by outcome: succeeded (handler returned, acked), "
            "retried or dead_lettered (copy confirmed, original acked).",
            labels=["queue", "outcome"],
        )
        deliveries = CounterMetricFamily(
            "steadyrabbit_queue_deliveries",
            "Deliveries received per queue (redeliveries included).",
            labels=["queue"],
        )
        duplicates = CounterMetricFamily(
            "steadyrabbit_queue_duplicates_suppressed",
            "Copies acked without running per queue: that message had completed before.",
            labels=["queue"],
        )
        handoffs = CounterMetricFamily(
            "steadyrabbit_queue_handoffs",
            "Deliveries per queue acked early while their handler ran on past the reach of "
            "consumer_timeout (a marker stands for the run).",
            labels=["queue"],
        )
        markers = CounterMetricFamily(
            "steadyrabbit_queue_markers_settled",
            "Hand-off markers per queue settled without running (dropped or delayed again).",
            labels=["queue"],
        )
        durations = HistogramMetricFamily(
            "steadyrabbit_handler_duration_seconds",
            "Time spent in the handler per message (decoding and the retry or dead-letter "
            "copy excluded).",
            labels=["queue"],
        )
        for consumer in consumers:
            queue = [consumer.spec.queue]
            running.add_metric(queue, consumer.in_flight)
            waiting.add_metric(queue, consumer.waiting)
            since = consumer.oldest_unacked()
            oldest.add_metric(queue, 0.0 if since is None else max(0.0, now - since))
            ready.add_metric(queue, 1 if consumer.ready.is_set() else 0)
            counts = consumer.counts
            deliveries.add_metric(queue, counts.delivered)
            outcomes.add_metric([*queue, "succeeded"], counts.succeeded)
            outcomes.add_metric([*queue, "retried"], counts.retried)
            outcomes.add_metric([*queue, "dead_lettered"], counts.dead_lettered)
            duplicates.add_metric(queue, counts.duplicates)
            handoffs.add_metric(queue, counts.handed_off)
            markers.add_metric(queue, counts.markers)
            recorded = self._durations.get(consumer.spec.queue)
            if recorded is not None:
                durations.add_metric(queue, recorded.cumulative(), recorded.total)
        yield running
        yield waiting
        yield oldest
        yield _gauge(
            "consumer_timeout_seconds",
            "The broker's consumer_timeout as configured for this worker (--consumer-timeout).",
            self._worker.settings.consumer_timeout,
        )
        yield ready
        yield deliveries
        yield outcomes
        yield duplicates
        yield handoffs
        yield markers
        yield durations


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"steadyrabbit_{name}", documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"steadyrabbit_{name}", documentation, value=value)


class MetricsServer(Middleware):
    """The HTTP endpoint of one worker, as a middleware: it times every handler run
    (``around_handler``), serves while the worker runs (``on_worker_start`` to
    ``on_worker_stop``), and reads the worker's state at scrape time.

    A minimal HTTP/1.1 server (GET and HEAD of a few paths, one request per connection) on
    :func:`asyncio.start_server`, so that it answers exactly as long as the event loop that
    owns the AMQP connection turns.
    """

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._worker: WorkerView | None = None
        self._durations: dict[str, Durations] = {}
        self._traffic = BrokerTraffic()
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._started = monotonic()
        self._started_at = time()
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self.address: tuple[str, int] | None = None

    async def around_handler(self, message: Message, call_next: CallNext) -> Any:
        started = perf_counter()
        try:
            return await call_next(message)
        finally:
            durations = self._durations.get(message.queue)
            if durations is not None:
                durations.observe(perf_counter() - started)

    async def on_worker_start(self, worker: WorkerView) -> None:
        """Listen (a port in use stops the worker before it connects), and keep each
        consumer's running messages for the status page."""
        self._worker = worker
        for consumer in worker.consumers:
            consumer.track_running()
            self._durations[consumer.spec.queue] = Durations()
        self.registry.register(WorkerCollector(worker, self._durations, self._traffic))
        await self.start()

    async def on_worker_stop(self, worker: WorkerView) -> None:
        await self.stop()

    @property
    def _watched(self) -> WorkerView:
        assert self._worker is not None, "it serves only from on_worker_start on"
        return self._worker

    async def start(self) -> None:
        """Listen; raises :class:`ConfigurationError` if the address cannot be bound."""
        try:
            server = await asyncio.start_server(
                self._serve_client, self._host, self._port, limit=_MAX_REQUEST_HEAD
            )
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else str(exc)
            raise ConfigurationError(
                f"cannot serve metrics on {_host_port(self._host, self._port)}: {reason} "
                "(choose another --metrics-port)"
            ) from None
        self._server = server
        host, port = server.sockets[0].getsockname()[:2]
        self.address = (str(host), int(port))
        log.info(
            "metrics on http://%s/metrics (health: /healthz, /readyz; status page: /)",
            _host_port(host, port),
        )

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        clients = set(self._clients)
        for task in clients:
            task.cancel()
        if clients:
            await asyncio.wait(clients)
        await server.wait_closed()
        self.address = None

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _REQUEST_TIMEOUT)
            except asyncio.LimitOverrunError:
                head = b""  # too long: answered as a bad request
            except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                return
            await self._answer(writer, head)
        except ConnectionError:
            pass  # the client went away
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            if task is not None:
                self._clients.discard(task)

    async def _answer(self, writer: asyncio.StreamWriter, head: bytes) -> None:
        request = _parse_request(head)
        extra: dict[str, str] = {}
        if request is None:
            status, content_type, body = 400, _TEXT, b"bad request\n"
            method = "GET"
        else:
            method, path, headers = request
            self._traffic.look(self._watched.connections)
            if method not in ("GET", "HEAD"):
                status, content_type, body = 405, _TEXT, b"only GET and HEAD\n"
                extra["Allow"] = "GET, HEAD"
            elif path == "/metrics":
                status, content_type, body = self._metrics(headers.get("accept", ""))
            elif path == "/healthz":
                status, content_type, body = 200, _TEXT, b"ok\n"
            elif path == "/readyz":
                reason = not_ready_reason(self._watched)
                if reason is None:
                    status, content_type, body = 200, _TEXT, b"ready\n"
                else:
                    status, content_type, body = 503, _TEXT, f"not ready: {reason}\n".encode()
            elif path == "/status.json":
                status, content_type, body = self._status()
            elif path in ("/", "/status"):
                body, extra["Content-Security-Policy"] = status_page()
                status, content_type = 200, _HTML
                extra["X-Content-Type-Options"] = "nosniff"
            else:
                status, content_type, body = 404, _TEXT, f"not found: try {_PATHS}\n".encode()
        lines = [
            f"HTTP/1.1 {status} {_REASONS[status]}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
            "Connection: close",
            *(f"{name}: {value}" for name, value in extra.items()),
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if method != "HEAD":
            writer.write(body)
        await writer.drain()

    def _status(self) -> tuple[int, str, bytes]:
        try:
            document = build_status(
                self._watched,
                self._durations,
                self._traffic,
                started=self._started,
                started_at=self._started_at,
            )
        except Exception:
            log.exception("building the status document failed")
            return 500, _TEXT, b"building the status failed; see the worker's log\n"
        return 200, _JSON, json.dumps(document, separators=(",", ":")).encode()

    def _metrics(self, accept: str) -> tuple[int, str, bytes]:
        encoder, content_type = choose_encoder(accept)
        try:
            return 200, content_type, encoder(self.registry)
        except Exception:
            log.exception("collecting metrics failed")
            return 500, _TEXT, b"collecting metrics failed; see the worker's log\n"


def _parse_request(head: bytes) -> tuple[str, str, dict[str, str]] | None:
    """(method, path, lower-cased headers) of an HTTP/1.x request head, or None if malformed."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1]:
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    try:
        path = urlsplit(parts[1]).path
    except ValueError:
        return None
    return parts[0], path, headers


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
