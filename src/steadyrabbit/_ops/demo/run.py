"""``steadyrabbit demo``: the README's main job, end to end, against a real broker.

Imports no click: the CLI draws the publishing progress from the ``progress`` callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import secrets
from collections.abc import Callable, Sequence
from dataclasses import replace
from time import monotonic
from typing import TextIO, cast
from urllib.parse import quote

from ..._amqp import first_connection
from ..._errors import ConfigurationError, StatusUnavailableError
from ..._retry import RetryPolicy
from ..._settings import Settings
from ..._topology import dead_letter_queue_name, retry_queue_name
from ..._url import BrokerAddress
from ..._worker import Worker
from ...testing import FaultProxy
from ..relay import relay_app
from ..top import watch
from .broker import DemoBroker, Progress
from .result import DemoResult
from .service import FlakyService, contract_number, pick_poison

__all__ = [
    "DEFAULT_EXCHANGE",
    "DEFAULT_QUEUE",
    "DEFAULT_ROUTING_KEY",
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
#: Between status lines when the output is not a terminal (a log, CI): a few lines, no flood.
PIPED_STATUS_INTERVAL = 5.0
#: How often the broker is asked whether the dead letters have arrived, once the service has
#: accepted everything else (only the broker knows).
_SETTLE_CHECK_INTERVAL = 0.2


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
    progress: Progress | None = None,
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
    ``seed``: the service's random answers. ``progress``: called with (messages published so far,
    backlog) before the first message and after each confirmed one (the CLI draws a progress
    bar with it); None reports nothing. ``queue``, ``exchange``, ``routing_key``: the
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
    poison = pick_poison(ids)
    cut_at = max(1, min(round(messages * cut_after), messages - len(poison)))
    service = FlakyService(
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
            f"contract {contract_number(i)} always {status}"
            for i, status in sorted(poison.items(), key=lambda item: contract_number(item[0]) or 0)
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
        broker = DemoBroker(connection)
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
        duplicates_suppressed=stats.duplicates,
        left_in_queues=left,
        lost=max(0, messages - len(delivered_ids | dead_ids) - left),
        elapsed=monotonic() - started,
        timed_out=timed_out,
        kept=keep,
        service_failures=service.server_errors,
        poison=tuple(sorted(poison, key=lambda i: contract_number(i) or 0)),
        dead_letters=tuple(sorted(dead_letters, key=lambda d: d.contract or 0)),
        events=tuple(say.events),
    )


async def _relay_until_settled(
    *,
    worker: Worker,
    service: FlakyService,
    proxy: FaultProxy,
    broker: DemoBroker,
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
            f"reconnects {stats.reconnect_count}, duplicates suppressed {stats.duplicates}"
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
