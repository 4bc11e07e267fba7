"""``steadyrabbit demo``: the README's main job, end to end, against a real broker.

It publishes a backlog of JSON "contracts" (the first incident's shape: a durable topic exchange,
a durable queue bound with a routing key), starts a local web service that is slow and fails
now and then, and relays the queue to it with :func:`relay_app` in this process, showing the
worker's live view. A third of the way through it resets the worker's connections (RST, the
incident's ``ConnectionResetError(104)``) through :class:`steadyrabbit.testing.FaultProxy`, so
no root or ``rabbitmqctl`` is needed. Then it waits until every message is settled, stops the
worker gracefully and accounts for every message from the service's record, the worker's
counters and the broker's queues: delivered, retried, dead-lettered, reconnects, duplicates,
lost.

The demo owns its queue, the queue's retry and dead-letter queues and its exchange: it deletes
them before it starts (leftovers of an interrupted run cannot skew it) and, unless asked to keep
them, when it ends. Never point it at a queue that holds anything you want.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import random
import secrets
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from time import monotonic
from typing import TextIO, cast
from urllib.parse import quote

import click
import pika.spec

from ._amqp import NOT_FOUND, AmqpChannel, AmqpConnection, first_connection
from ._errors import (
    ChannelClosedError,
    ClosedByUserError,
    ConfigurationError,
    StatusUnavailableError,
)
from ._headers import REASON
from ._ops.relay import relay_app
from ._ops.top import watch
from ._retry import RetryPolicy
from ._settings import Settings
from ._topology import (
    bind_queue,
    dead_letter_queue_name,
    ensure_exchange,
    ensure_queue,
    retry_queue_name,
)
from ._url import BrokerAddress
from ._worker import Worker
from .testing import FaultProxy

__all__ = [
    "DEFAULT_EXCHANGE",
    "DEFAULT_QUEUE",
    "DEFAULT_ROUTING_KEY",
    "DeadLetterInfo",
    "DemoResult",
    "demo_command",
    "format_summary",
    "run_demo",
]

DEFAULT_QUEUE = "steadyrabbit-demo.contracts"
DEFAULT_EXCHANGE = "steadyrabbit-demo"
DEFAULT_ROUTING_KEY = "purchasing.system.contract"

#: The relay's retry policy: short delays so that retries finish while the demo watches.
MAX_ATTEMPTS = 3
RETRY_DELAYS = (0.5, 1.0)
#: The relay's HTTP timeout; the service never takes this long.
HTTP_TIMEOUT = 10.0
#: Statuses of the two poison contracts: one the service refuses (dead-lettered at once), one
#: it always fails on (dead-lettered once the attempts are used up).
POISON_REFUSED = 422
POISON_FAILING = 500
_POISON_TEXT = {
    POISON_REFUSED: "contract {n}: unknown supplier, cannot report it",
    POISON_FAILING: "contract {n}: the reporting backend crashed on it",
}
_STATUS_TEXT = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    422: "Unprocessable Entity",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
#: Between status lines when the output is not a terminal (a log, CI): a few lines, no flood.
PIPED_STATUS_INTERVAL = 5.0
#: How often the broker is asked whether the dead letters have arrived, once the service has
#: accepted everything else (only the broker knows).
_SETTLE_CHECK_INTERVAL = 0.2


# -- results -----------------------------------------------------------------------------------


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
    dropped because the channel that delivered the message had died. ``duplicates``: extra 2xx
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
        lines.append(f"  {label:<14}{value!s:>6}   {note}".rstrip())

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
    if r.duplicates:
        row(
            "duplicates",
            r.duplicates,
            f"at-least-once: {r.duplicated_messages} message(s) handled around the reset were "
            "delivered again: their acks never reached the broker, which redelivered them",
        )
    else:
        row("duplicates", 0, "no message was delivered twice")
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


# -- the local web service ---------------------------------------------------------------------


class _Service:
    """A slow, sometimes failing HTTP/1.1 service on 127.0.0.1 (keep-alive, one POST path).

    It answers each message by its ``X-Message-Id``: the poison ones always with their status;
    the others with 503 at ``failure_rate``, but never so often that a message would run out of
    attempts; else 200. It records what it accepted, and sets ``cut_point`` once
    ``cut_at`` distinct messages were accepted and ``all_accepted`` once every non-poison one
    was.
    """

    def __init__(
        self,
        *,
        ids: Sequence[str],
        poison: Mapping[str, int],
        delay: tuple[float, float],
        failure_rate: float,
        max_failures: int,
        cut_at: int,
        seed: int,
    ) -> None:
        self._known = set(ids)
        self._poison = dict(poison)
        self._target = len(self._known) - len(self._poison)
        self._delay = delay
        self._failure_rate = failure_rate
        self._max_failures = max_failures
        self._cut_at = cut_at
        self._rng = random.Random(seed)
        self.accepted: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()  # 5xx answers to non-poison messages
        self.server_errors = 0  # 5xx answers, the poison ones included
        self.in_flight = 0
        self.cut_point = asyncio.Event()
        self.all_accepted = asyncio.Event()
        if self._target == 0:
            self.all_accepted.set()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.url = ""

    async def __aenter__(self) -> _Service:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/contracts"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        # The relay's client is closed by now (worker shutdown); close what is left anyway, so
        # that every connection task ends and is collected here. Connections first: from
        # Python 3.12 on, wait_closed() waits for them.
        for writer in self._writers:
            writer.close()
        if self._connections:
            await asyncio.wait(self._connections)
        await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                headers: dict[str, str] = {}
                for line in header_lines:
                    name, _, value = line.partition(":")
                    if name:
                        headers[name.strip().lower()] = value.strip()
                # The body is not needed: the message id says which contract it is.
                await reader.readexactly(int(headers.get("content-length") or 0))
                if request_line.startswith("POST "):
                    status, text = await self._answer(headers.get("x-message-id", ""))
                else:
                    status, text = 404, "POST your contracts here"
                payload = text.encode()
                writer.write(
                    f"HTTP/1.1 {status} {_STATUS_TEXT.get(status, 'Error')}\r\n"
                    f"Content-Type: text/plain; charset=utf-8\r\n"
                    f"Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, OSError):
            pass  # the client went away or spoke something else: end this connection
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, message_id: str) -> tuple[int, str]:
        if message_id not in self._known:
            return 400, f"unknown message id {message_id!r}"
        # Drawn when the request arrives, so one seed gives one sequence of answers.
        seconds = self._rng.uniform(*self._delay)
        flaky = self._rng.random() < self._failure_rate
        self.in_flight += 1
        try:
            await asyncio.sleep(seconds)
        finally:
            self.in_flight -= 1
        status = self._poison.get(message_id)
        if status is not None:
            self.server_errors += status >= 500
            return status, _POISON_TEXT[status].format(n=_contract(message_id))
        if flaky and self.failed[message_id] < self._max_failures:
            self.failed[message_id] += 1
            self.server_errors += 1
            return 503, "reporting backend busy, try again later"
        self.accepted[message_id] += 1
        accepted = len(self.accepted)
        if accepted >= self._cut_at:
            self.cut_point.set()
        if accepted >= self._target:
            self.all_accepted.set()
        return 200, "accepted"

    @property
    def duplicates(self) -> int:
        return sum(count - 1 for count in self.accepted.values())

    @property
    def duplicated_messages(self) -> int:
        return sum(1 for count in self.accepted.values() if count > 1)


# -- the demo ----------------------------------------------------------------------------------


class _Timeline:
    """Lines about what the demo did, with the seconds since it started; printed at once and
    kept for the summary (a live view on a terminal redraws over them)."""

    def __init__(self, out: TextIO, started: float) -> None:
        self._out = out
        self._started = started
        self.events: list[str] = []

    def __call__(self, text: str) -> None:
        line = f"{monotonic() - self._started:6.1f} s  {text}"
        self.events.append(line)
        self._out.write(line + "\n")
        self._out.flush()


class _FramedOutput(io.TextIOBase):
    """Hands the live view's frames to ``out`` with the demo's own lines under each one: on a
    terminal every frame clears the screen, and these lines would go with it."""

    def __init__(self, out: TextIO, footer: Callable[[], str]) -> None:
        self._out = out
        self._footer = footer

    def write(self, text: str) -> int:
        self._out.write(text + self._footer())
        return len(text)

    def flush(self) -> None:
        self._out.flush()

    def isatty(self) -> bool:
        return self._out.isatty()


async def run_demo(
    settings: Settings,
    *,
    out: TextIO,
    messages: int = 60,
    concurrency: int = 2,
    service_delay: tuple[float, float] = (0.2, 1.0),
    failure_rate: float = 0.15,
    cut_after: float = 1 / 3,
    live: bool = True,
    interval: float = 1.0,
    keep: bool = False,
    settle_timeout: float | None = None,
    seed: int = 42,
    progress: TextIO | None = None,
    queue: str = DEFAULT_QUEUE,
    exchange: str = DEFAULT_EXCHANGE,
    routing_key: str = DEFAULT_ROUTING_KEY,
) -> DemoResult:
    """Run the demo against the first broker of ``settings``; return what happened.

    ``out``: where the demo writes (its header, the live view, the connection cut and its
    recovery). ``messages``: the backlog (from 5 on, two of them are poison: one refused with
    422, one always failing with 500). ``concurrency``: requests the relay keeps in flight (and
    its prefetch). ``service_delay``: the service takes between these many seconds per call.
    ``failure_rate``: share of calls it fails with 503 (retried, never beyond the attempts a
    message has). ``cut_after``: share of the backlog accepted before the connections are reset.
    ``live``: show the worker's live view (``steadyrabbit top``) every ``interval`` seconds on a
    terminal; when ``out`` is not a terminal, or without ``live``, one status line every
    ``PIPED_STATUS_INTERVAL`` seconds instead. ``keep``: leave the queues and the exchange on
    the broker at the end. ``settle_timeout``: seconds to wait for every message to settle
    (default: three times the expected run time, plus a minute).
    ``seed``: the service's random answers. ``progress``: where to draw the publishing progress
    bar (the CLI passes stderr); None draws none. ``queue``, ``exchange``, ``routing_key``: the
    demo's topology, deleted before the run (and after it, unless ``keep``).

    Raises :class:`ConfigurationError` for bad arguments, and what the broker or the worker
    raise when they cannot go on (bad credentials, no broker). The settings' other brokers,
    metrics and alert options are not used: the worker connects through the demo's proxy and
    serves its metrics on a free local port.
    """
    _check(messages, concurrency, service_delay, failure_rate, cut_after, interval, settle_timeout)
    address = settings.addresses[0]
    if address.tls:
        raise ConfigurationError(
            "the demo cuts the connection with a plain TCP proxy: give an amqp:// broker URL, "
            "not amqps://"
        )
    if settle_timeout is None:
        expected = messages * 1.3 * sum(service_delay) / 2 / concurrency
        settle_timeout = 60.0 + 3 * expected
    started = monotonic()
    say = _Timeline(out, started)
    policy = RetryPolicy(max_attempts=MAX_ATTEMPTS, delays=RETRY_DELAYS)
    dlq = dead_letter_queue_name(queue)
    retry_queues = sorted({retry_queue_name(queue, policy.bucket_ms(d)) for d in RETRY_DELAYS})
    run_id = secrets.token_hex(3)  # fresh ids: no crash-loop record of an earlier run applies
    ids = [f"contract-{n}-{run_id}" for n in range(1, messages + 1)]
    poison = _poison(ids)
    cut_at = max(1, min(round(messages * cut_after), messages - len(poison)))
    service = _Service(
        ids=ids,
        poison=poison,
        delay=service_delay,
        failure_rate=failure_rate,
        max_failures=MAX_ATTEMPTS - 1,
        cut_at=cut_at,
        seed=seed,
    )
    async with (
        service,
        FaultProxy((address.host, address.port)) as proxy,
        first_connection(
            settings.addresses,
            heartbeat=settings.heartbeat,
            connect_timeout=settings.connect_timeout,
            name=f"{settings.name} demo (admin)",
        ) as connection,
    ):
        poisoned = ", ".join(
            f"contract {_contract(i)} always {status}"
            for i, status in sorted(poison.items(), key=lambda item: _contract(item[0]) or 0)
        )
        out.write(
            "steadyrabbit demo: relay a backlog to a slow, flaky web service, and reset the "
            "connection part-way\n"
            f"  broker   {address.display}\n"
            f"  queue    {queue} <- exchange {exchange} (topic), routing key {routing_key}\n"
            f"  service  {service.url}: {service_delay[0]:g}-{service_delay[1]:g} s a call, "
            f"{failure_rate:.0%} answered 503" + (f"; {poisoned}" if poisoned else "") + "\n"
            f"  relay    concurrency {concurrency}, {MAX_ATTEMPTS} attempts, retries after "
            f"{' s, '.join(f'{d:g}' for d in RETRY_DELAYS)} s, through a proxy on "
            f"127.0.0.1:{proxy.port} that resets the connection after {cut_at} accepted\n"
        )
        out.flush()
        broker = _Broker(connection)
        await broker.reset(queue, exchange, routing_key, [dlq, *retry_queues])
        await broker.publish_backlog(exchange, routing_key, ids, progress)
        say(f"published {messages} messages to {exchange}, each confirmed by the broker")

        app = relay_app(
            queue,
            service.url,
            timeout=HTTP_TIMEOUT,
            concurrency=concurrency,
            exchange=exchange,
            routing_key=routing_key,
            retry=policy,
        )
        worker = Worker(
            app,
            replace(
                settings,
                urls=(_proxied_url(address, proxy.port),),
                name=f"{settings.name} demo",
                metrics_port=0 if live else None,
                metrics_host="127.0.0.1",
                alerts=None,  # staged failures must not page anyone
            ),
        )
        await worker.start()
        say(f"relaying {queue} to {service.url}")
        try:
            cuts, timed_out = await _relay_until_settled(
                worker=worker,
                service=service,
                proxy=proxy,
                broker=broker,
                say=say,
                out=out,
                live=live,
                interval=interval,
                settle_timeout=settle_timeout,
                published=messages,
                dlq=dlq,
                poison=len(poison),
                queues=[queue, *retry_queues],
            )
        except BaseException:
            await worker.abort()
            raise
        await worker.stop()
        say("worker stopped gracefully")

        # With the worker gone, whatever it had not settled is back in its queue: these counts
        # are complete.
        left = 0
        for name in (queue, *retry_queues):
            left += await broker.ready(name)
        dead_letters = await broker.read_dead_letters(dlq, keep=keep)
        if not keep:
            await broker.delete(exchange, [queue, dlq, *retry_queues])

    delivered_ids = set(service.accepted)
    dead_ids = {letter.message_id for letter in dead_letters}
    stats = worker.stats
    return DemoResult(
        queue=queue,
        dead_letter_queue=dlq,
        published=messages,
        delivered=len(delivered_ids),
        retried=stats.retried,
        dead_lettered=len(dead_ids),
        reconnects=stats.reconnect_count,
        cuts=cuts,
        stale_acks_dropped=stats.stale_settlements_dropped,
        duplicates=service.duplicates,
        duplicated_messages=service.duplicated_messages,
        left_in_queues=left,
        lost=max(0, messages - len(delivered_ids | dead_ids) - left),
        elapsed=monotonic() - started,
        timed_out=timed_out,
        kept=keep,
        service_failures=service.server_errors,
        poison=tuple(sorted(poison, key=lambda i: _contract(i) or 0)),
        dead_letters=tuple(sorted(dead_letters, key=lambda d: d.contract or 0)),
        events=tuple(say.events),
    )


def demo_command(
    settings: Settings,
    *,
    messages: int = 60,
    concurrency: int = 2,
    live: bool = True,
    keep: bool = False,
    seed: int = 42,
    out: TextIO | None = None,
    progress: TextIO | None = None,
) -> int:
    """``steadyrabbit demo``: run :func:`run_demo` on stdout (the progress bar on stderr),
    print the summary, and return the exit status: 0 only when every message is accounted for.

    Ctrl-C stops at once with :class:`ClosedByUserError` (one line from the CLI): the worker is
    aborted and the broker keeps the demo's queues until the next run deletes them.
    """
    stream = sys.stdout if out is None else out
    try:
        result = asyncio.run(
            run_demo(
                settings,
                out=stream,
                messages=messages,
                concurrency=concurrency,
                live=live,
                keep=keep,
                seed=seed,
                progress=sys.stderr if progress is None else progress,
            )
        )
    except KeyboardInterrupt:
        stream.write("\n")
        raise ClosedByUserError(
            "demo interrupted; its queues stay on the broker until the next run deletes them"
        ) from None
    stream.write("\n" + format_summary(result))
    stream.flush()
    return 0 if result.ok else 1


async def _relay_until_settled(
    *,
    worker: Worker,
    service: _Service,
    proxy: FaultProxy,
    broker: _Broker,
    say: _Timeline,
    out: TextIO,
    live: bool,
    interval: float,
    settle_timeout: float,
    published: int,
    dlq: str,
    poison: int,
    queues: Sequence[str],
) -> tuple[int, bool]:
    """Run the view and the connection cut while the worker relays; return (cuts, timed out)."""
    cuts: list[int] = []
    stop_view = asyncio.Event()

    async def cut() -> None:
        await service.cut_point.wait()
        running = service.in_flight
        accepted = len(proxy.connections)
        sockets = proxy.reset()
        cuts.append(sockets)
        cut_at = monotonic()
        say(
            f"CUT: reset {sockets} connections to the broker (SO_LINGER 0: the worker reads "
            f"ConnectionResetError(104)) with {running} request(s) in flight"
        )
        await proxy.wait_for_connection(accepted)  # the first reconnection
        await asyncio.gather(*(c.ready.wait() for c in worker.consumers))
        say(
            f"BACK: reconnected after {monotonic() - cut_at:.1f} s and consuming again; the "
            "messages in flight at the reset come again"
        )

    async def settled() -> None:
        await service.all_accepted.wait()
        # Only the broker can tell that the dead letters arrived: ask until they are there and
        # nothing is left to run, twice in a row (a retry copy on its way back from its retry
        # queue is in no queue for a moment).
        quiet = 0
        while quiet < 2:
            await asyncio.sleep(_SETTLE_CHECK_INTERVAL)
            quiet = quiet + 1 if await idle() else 0

    async def idle() -> bool:
        if worker.in_flight or service.in_flight or await broker.ready(dlq) < poison:
            return False
        for name in queues:
            if await broker.ready(name):
                return False
        return True

    def status_line() -> str:
        stats = worker.stats
        return (
            f"delivered {len(service.accepted)}/{published}, in flight {worker.in_flight}, "
            f"retried {stats.retried}, dead-lettered {stats.dead_lettered}, "
            f"reconnects {stats.reconnect_count}, duplicates {service.duplicates}"
        )

    async def view() -> None:
        address = worker.metrics_address
        url = None if address is None else f"http://{address[0]}:{address[1]}"
        if url is not None and out.isatty():
            framed = _FramedOutput(
                out, lambda: "\ndemo: " + status_line() + "\n" + "\n".join(say.events) + "\n"
            )
            try:
                await watch(
                    url,
                    interval=interval,
                    out=cast(TextIO, framed),
                    stop=stop_view,
                )
            except StatusUnavailableError as exc:
                say(f"no live view: {exc}")
            else:
                return
        elif url is not None:
            say(f"live view from another terminal: steadyrabbit top {url}")
        while not stop_view.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_view.wait(), PIPED_STATUS_INTERVAL)
            if not stop_view.is_set():
                say(status_line())

    cutter = asyncio.ensure_future(cut())
    viewer = asyncio.ensure_future(view())
    waiting = asyncio.ensure_future(settled())
    failed = asyncio.ensure_future(worker.wait_failed())
    try:
        await asyncio.wait(
            {waiting, failed}, timeout=settle_timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        stop_view.set()
        for task in (cutter, waiting, failed):
            task.cancel()
        await asyncio.wait({cutter, viewer, waiting, failed})
    if not failed.cancelled():
        raise failed.result()
    for task in (cutter, viewer, waiting):
        if not task.cancelled() and task.exception() is not None:
            raise cast(BaseException, task.exception())
    timed_out = waiting.cancelled()
    if timed_out:
        say(f"TIMEOUT: not every message settled within {settle_timeout:g} s: {status_line()}")
    else:
        say(f"every message settled: {status_line()}")
    return len(cuts), timed_out


# -- the broker side ---------------------------------------------------------------------------


class _Broker:
    """The demo's own operations on the broker, on a direct connection (not through the proxy,
    so the cut does not touch it)."""

    def __init__(self, connection: AmqpConnection) -> None:
        self._connection = connection
        self._channel: AmqpChannel | None = None

    async def _open(self) -> AmqpChannel:
        channel = await self._connection.channel()
        self._channel = channel
        return channel

    async def channel(self) -> AmqpChannel:
        channel = self._channel
        if channel is None or not channel.is_open:
            channel = await self._open()
        return channel

    async def reset(
        self, queue: str, exchange: str, routing_key: str, own_queues: Sequence[str]
    ) -> None:
        """Delete what an earlier run left, then declare the exchange, queue and binding."""
        _ready, consumers = await self._counts(queue)
        if consumers:
            raise ConfigurationError(
                f"queue {queue!r} has {consumers} consumer(s): is another demo running against "
                "this broker? Wait for it to end"
            )
        await self.delete(exchange, [queue, *own_queues])
        channel = await self.channel()
        channel = await ensure_exchange(channel, self._open, exchange, "topic")
        channel = await ensure_queue(channel, self._open, queue)
        await bind_queue(channel, queue, exchange, routing_key)

    async def _counts(self, queue: str) -> tuple[int, int]:
        """(messages ready, consumers) of ``queue``; (0, 0) if it does not exist."""
        channel = await self.channel()
        try:
            return await channel.declare_queue(queue, passive=True)
        except ChannelClosedError as exc:
            if exc.reply_code == NOT_FOUND:
                return 0, 0
            raise

    async def ready(self, queue: str) -> int:
        """Messages ready in ``queue`` (0 if it does not exist); unacked ones do not count."""
        ready, _consumers = await self._counts(queue)
        return ready

    async def delete(self, exchange: str, queues: Sequence[str]) -> None:
        channel = await self.channel()
        for name in queues:
            await channel.delete_queue(name)
        await channel.delete_exchange(exchange)

    async def publish_backlog(
        self, exchange: str, routing_key: str, ids: Sequence[str], progress: TextIO | None
    ) -> None:
        channel = await self._connection.channel()
        try:
            await channel.enable_confirms()
            with contextlib.ExitStack() as stack:
                bar = None
                if progress is not None:
                    bar = stack.enter_context(
                        click.progressbar(
                            length=len(ids), label="publishing", file=progress, show_pos=True
                        )
                    )
                for n, message_id in enumerate(ids, 1):
                    body = {
                        "contract": n,
                        "supplier": f"supplier-{n % 7 + 1}",
                        "amount": round(1000 + n * 37.5, 2),
                        "currency": "EUR",
                    }
                    await channel.publish_confirmed(
                        exchange,
                        routing_key,
                        json.dumps(body).encode(),
                        pika.spec.BasicProperties(
                            content_type="application/json",
                            delivery_mode=2,
                            message_id=message_id,
                        ),
                    )
                    if bar is not None:
                        bar.update(1)
        finally:
            channel.close()

    async def read_dead_letters(self, dlq: str, *, keep: bool) -> list[DeadLetterInfo]:
        """The distinct messages in ``dlq`` with their reasons; left in place when ``keep``."""
        channel = await self._open()
        letters: dict[str, DeadLetterInfo] = {}
        last_tag = 0
        try:
            while True:
                try:
                    got = await channel.get(dlq)
                except ChannelClosedError as exc:
                    if exc.reply_code == NOT_FOUND:
                        break
                    raise
                if got is None:
                    break
                method, props, _body = got
                last_tag = int(method.delivery_tag or 0)
                message_id = str(props.message_id or "?")
                reason = (props.headers or {}).get(REASON)
                if isinstance(reason, bytes):
                    reason = reason.decode("utf-8", "replace")
                letters.setdefault(
                    message_id,
                    DeadLetterInfo(message_id, _contract(message_id), str(reason or "?")),
                )
        finally:
            if last_tag and channel.is_open:
                # Every message taken, in order: back where it was, or gone for good.
                if keep:
                    channel.nack(last_tag, requeue=True, multiple=True)
                else:
                    channel.ack(last_tag)  # the queue is deleted next anyway
                    channel.flush_acks()
        return list(letters.values())


# -- helpers -----------------------------------------------------------------------------------


def _check(
    messages: int,
    concurrency: int,
    service_delay: tuple[float, float],
    failure_rate: float,
    cut_after: float,
    interval: float,
    settle_timeout: float | None,
) -> None:
    if not 1 <= messages <= 1_000_000:
        raise ConfigurationError("the demo's backlog must be 1 to 1000000 messages")
    if not 1 <= concurrency <= 1000:
        raise ConfigurationError("the demo's concurrency must be 1 to 1000")
    low, high = service_delay
    if not 0 <= low <= high < HTTP_TIMEOUT:
        raise ConfigurationError(
            f"the service delay must be a range 0 <= low <= high < {HTTP_TIMEOUT:g} seconds"
        )
    if not 0 <= failure_rate < 1:
        raise ConfigurationError("the failure rate must be >= 0 and < 1")
    if not 0 < cut_after < 1:
        raise ConfigurationError("the cut must come part-way: 0 < cut_after < 1")
    if not interval > 0:
        raise ConfigurationError("the live view's interval must be > 0 seconds")
    if settle_timeout is not None and not settle_timeout > 0:
        raise ConfigurationError("the settle timeout must be > 0 seconds")


def _poison(ids: Sequence[str]) -> dict[str, int]:
    """The message ids the service will always fail, with the status it answers: a fifth and
    half way into the backlog, so both are handled while the demo watches."""
    if len(ids) < 5:
        return {}
    return {ids[len(ids) // 5 - 1]: POISON_REFUSED, ids[len(ids) // 2 - 1]: POISON_FAILING}


def _contract(message_id: str) -> int | None:
    parts = message_id.split("-")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def _proxied_url(address: BrokerAddress, port: int) -> str:
    """``address``'s credentials and virtual host, on the proxy's port. Never printed."""
    query = []
    if address.heartbeat is not None:
        query.append(f"heartbeat={address.heartbeat}")
    if address.connection_timeout is not None:
        query.append(f"connection_timeout={address.connection_timeout:g}")
    return (
        f"amqp://{quote(address.username, safe='')}:{quote(address.password, safe='')}"
        f"@127.0.0.1:{port}/{quote(address.vhost, safe='')}"
        + (f"?{'&'.join(query)}" if query else "")
    )
