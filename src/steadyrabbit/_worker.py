"""The worker: runs an app's consumers on the event loop, and stops them gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine
from types import CodeType, TracebackType
from typing import TYPE_CHECKING, Any

from ._aio import finish
from ._app import App
from ._consumer import Consumer
from ._crashguard import CrashLoopCounter, CrashRecords
from ._crashlog import default_state_dir
from ._errors import ClosedByUserError, ConfigurationError, SteadyRabbitError
from ._gate import UNSTARTED_PATIENCE_SHARE, SoloGate
from ._idempotency import Leases, lease_store
from ._leases import this_process
from ._middleware import Hooks, Middleware
from ._publisher import ConfirmedPublisher
from ._settings import Settings
from ._stats import Stats
from ._supervisor import Supervisor
from ._watchdog import LoopLagWatchdog

if TYPE_CHECKING:
    from ._amqp import AmqpConnection
    from ._metrics import MetricsServer

log = logging.getLogger("steadyrabbit")

_CLOSE_TIMEOUT = 5.0


class Worker:
    """Runs ``app`` against the brokers in ``settings``. Use from a running event loop::

        async with Worker(app, settings) as worker:   # returns once every consumer is ready
            await worker.wait_failed()                # or your own stop condition

    Leaving the block stops gracefully (see :meth:`stop`).
    """

    def __init__(self, app: App, settings: Settings | None = None) -> None:
        if not app.handlers:
            raise ConfigurationError("the app has no handlers: register one with @app.consumer")
        self.app = app
        self.settings = settings or Settings()
        self.stats = Stats()
        self._consumers: list[Consumer] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._supervisors: list[Supervisor] = []
        self._publisher: ConfirmedPublisher | None = None
        self._watchdog: LoopLagWatchdog | None = None
        self._metrics: MetricsServer | None = None
        self._hooks = Hooks()
        self._crash_records: CrashRecords | None = None
        self._leases: Leases | None = None
        self._gate = SoloGate()
        self._failed: asyncio.Future[SteadyRabbitError] | None = None
        self._stopping = False
        self._closed = False

    @property
    def ready(self) -> bool:
        """Connected, and every consumer registered with the broker."""
        return bool(self._consumers) and all(c.ready.is_set() for c in self._consumers)

    @property
    def negotiated_heartbeat(self) -> int | None:
        """The heartbeat interval agreed with the broker on the consuming connection, if up."""
        if not self._supervisors:
            return None
        connection = self._supervisors[0].connected
        return None if connection is None else connection.negotiated_heartbeat

    @property
    def in_flight(self) -> int:
        return sum(c.in_flight for c in self._consumers)

    @property
    def consumers(self) -> tuple[Consumer, ...]:
        return tuple(self._consumers)

    @property
    def connections(self) -> dict[str, AmqpConnection | None]:
        """Each connection by role (``consume``, ``publish``): the open one, or None."""
        return {s.role: s.connected for s in self._supervisors}

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def watchdog(self) -> LoopLagWatchdog | None:
        return self._watchdog

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """(host, port) of the metrics endpoint while it serves (see Settings.metrics_port)."""
        return None if self._metrics is None else self._metrics.address

    async def start(self) -> None:
        """Connect and start consuming; return once every consumer is ready.

        Raises :class:`ConfigurationError`, :class:`PermanentBrokerError` or
        :class:`BrokerUnreachableError` (after ``connect_timeout``) instead.
        """
        loop = asyncio.get_running_loop()
        settings = self.settings
        records = CrashRecords(settings.state_dir or default_state_dir())
        # A state directory that cannot hold the crash log stops the worker now, in one
        # sentence, rather than failing on the first redelivered message.
        await asyncio.to_thread(records.check)
        records.open()
        self._crash_records = records
        vhost = settings.addresses[0].vhost
        state_dir = settings.state_dir or default_state_dir()
        # Filled below, once the consumers exist (they compose their middleware first).
        lease_holders: dict[str, Consumer] = {}
        leases = Leases(
            lease_store(settings.idempotency_store, state_dir),
            owner=this_process(),
            vhost=vhost,
            consumers=lease_holders,
            keys=(
                {spec.queue: spec.idempotency_key for spec in self.app.handlers}
                if settings.idempotency
                else {}
            ),
            lease=settings.lease,
            retention=settings.idempotency_retention,
        )
        self._leases = leases
        # Leases are outermost: a duplicate is settled before any other middleware sees it.
        builtin = [leases, *self._builtin_middleware()]
        app_wide = [*builtin, *self.app.middleware]
        own = [m for spec in self.app.handlers for m in spec.middleware]
        everyone = list(dict.fromkeys([*app_wide, *own]))
        hooks = self._hooks = Hooks(everyone)
        self._failed = loop.create_future()
        consume = Supervisor(settings, self.stats, role="consume", hooks=hooks)
        publish = Supervisor(settings, self.stats, role="publish", hooks=hooks)
        self._supervisors = [consume, publish]
        self._publisher = ConfirmedPublisher(publish)
        for spec in self.app.handlers:
            if spec.threaded is not None:
                spec.threaded.open()
            # Crash-loop counting is the outermost around_redelivery: the solo run it may wait
            # for holds everything inside it.
            crash_loops = CrashLoopCounter(
                records,
                self._gate,
                max_starts=spec.retry.max_deliveries,
                patience=settings.consumer_timeout * UNSTARTED_PATIENCE_SHARE,
                vhost=vhost,
            )
            consumer_hooks = Hooks([crash_loops, *app_wide, *spec.middleware])
            consumer = Consumer(
                spec,
                consume,
                self._publisher,
                settings,
                self.stats,
                self._gate,
                consumer_hooks,
                self.app.exchange_bindings,
            )
            self._consumers.append(consumer)
            lease_holders[spec.queue] = consumer
        try:
            # First: a middleware may refuse the start (a metrics port in use) before any
            # connection is made.
            await hooks.on_worker_start(self)
        except BaseException:
            await self._close()
            raise
        self._spawn(consume.run(), "supervisor[consume]")
        self._spawn(publish.run(), "supervisor[publish]")
        for consumer in self._consumers:
            self._spawn(consumer.run(), f"consumer[{consumer.spec.queue}]")
            consumer.fatal.add_done_callback(lambda fut: self._fail(fut.result()))
        self._watchdog = LoopLagWatchdog(
            loop,
            settings.loop_lag_threshold,
            _handler_codes(self.app),
            self.stats,
            on_stall=hooks.on_loop_blocked if hooks.loop_blocked else None,
            message_frames=Consumer.handler_frames(),
        )
        self._watchdog.start()
        all_ready = asyncio.ensure_future(
            asyncio.gather(*(c.ready.wait() for c in self._consumers))
        )
        first: set[asyncio.Future[Any]] = {all_ready, self._failed}
        try:
            await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            await _cancel(all_ready)
            await self.abort()
            raise
        if not all_ready.done():
            await _cancel(all_ready)
            error = self._failed.result()
            await self.abort()
            raise error

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._stopping:
            return
        exc = task.exception()
        if isinstance(exc, SteadyRabbitError):
            self._fail(exc)
        elif exc is not None:
            log.error("%s crashed", task.get_name(), exc_info=exc)
            self._fail(SteadyRabbitError(f"{task.get_name()} crashed: {exc!r}"))

    def _fail(self, error: SteadyRabbitError) -> None:
        if self._failed is not None and not self._failed.done():
            self._failed.set_result(error)

    async def wait_failed(self) -> SteadyRabbitError:
        """Wait until the worker hits an error it cannot recover from, and return it."""
        assert self._failed is not None, "start() first"
        return await asyncio.shield(self._failed)

    async def stop(self, grace_period: float | None = None) -> bool:
        """Stop gracefully; return True if every running handler finished in time.

        Cancel the consumers, return unstarted messages to their queues at once, let running
        handlers finish within the grace period (heartbeats keep flowing), settle, close.
        """
        if self._closed:
            return True
        grace = self.settings.grace_period if grace_period is None else grace_period
        self._stopping = True
        self._gate.withdraw()
        await asyncio.gather(*(c.stop_consuming() for c in self._consumers))
        running = self.in_flight
        if running:
            log.info("waiting up to %g s for %d running handler(s) to finish", grace, running)
        finished = all(await asyncio.gather(*(c.drain(grace) for c in self._consumers)))
        if not finished:
            log.warning(
                "%d handler(s) still running after the %g s grace period; their messages stay "
                "unacked and the broker will redeliver them",
                self.in_flight,
                grace,
            )
            await asyncio.gather(*(c.abort() for c in self._consumers))
        await self._close()
        return finished

    async def abort(self) -> None:
        """Stop at once: running handlers are abandoned and their messages redelivered."""
        if self._closed:
            return
        self._stopping = True
        self._gate.withdraw()
        await asyncio.gather(*(c.abort() for c in self._consumers))
        await self._close()

    def _builtin_middleware(self) -> list[Middleware]:
        """``Settings.metrics_port`` and ``Settings.alerts`` as the built-in middleware; their
        modules (Prometheus, an HTTP server, SMTP) are imported only when wanted."""
        settings = self.settings
        builtin: list[Middleware] = []
        if settings.metrics_port is not None:
            from ._metrics import MetricsServer

            self._metrics = MetricsServer(settings.metrics_host, settings.metrics_port)
            builtin.append(self._metrics)
        if settings.alerts is not None:
            from ._alerts import Alerter

            builtin.append(Alerter(settings.alerts, settings))
        return builtin

    async def _close(self) -> None:
        for hook in self.app.shutdown_hooks:
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook %r failed", hook)
        await asyncio.gather(*(consumer.close() for consumer in self._consumers))
        if self._crash_records is not None:
            self._crash_records.close()
        if self._publisher is not None:
            self._publisher.close()
        for supervisor in self._supervisors:
            supervisor.close()
        # Middleware ends (pending alerts go out, the metrics endpoint stops) while the
        # connections close; both are bounded.
        await asyncio.gather(finish(self._tasks, _CLOSE_TIMEOUT), self._hooks.on_worker_stop(self))
        if self._watchdog is not None:
            self._watchdog.stop()
        for spec in self.app.handlers:
            if spec.threaded is not None:
                spec.threaded.close()
        self._closed = True

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.stop()
        else:
            await self.abort()


async def _cancel(future: asyncio.Future[Any]) -> None:
    future.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await future


def _handler_codes(app: App) -> dict[CodeType, str]:
    codes: dict[CodeType, str] = {}
    for spec in app.handlers:
        code = getattr(spec.function, "__code__", None)
        if isinstance(code, CodeType):
            codes[code] = f"{spec.name} of queue {spec.queue!r}"
    return codes


async def serve(app: App, settings: Settings | None = None, *, handle_signals: bool = True) -> bool:
    """Run ``app`` until SIGINT or SIGTERM; return True if it stopped gracefully.

    The first signal stops gracefully; a second one stops at once (the broker redelivers what
    was unacked). Raises the error that stopped the worker otherwise.
    """
    loop = asyncio.get_running_loop()
    worker = Worker(app, settings)
    stop = asyncio.Event()
    now = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("%s again: stopping now", signal.Signals(signum).name)
            now.set()
        else:
            log.info(
                "%s: stopping gracefully (send it again to stop at once)",
                signal.Signals(signum).name,
            )
            stop.set()

    signals = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
    for signum in signals:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await _serve(worker, stop, now)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


async def _serve(worker: Worker, stop: asyncio.Event, now: asyncio.Event) -> bool:
    stop_wait = asyncio.ensure_future(stop.wait())
    now_wait = asyncio.ensure_future(now.wait())
    try:
        start = asyncio.ensure_future(worker.start())
        await asyncio.wait({start, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not start.done():
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await start
            return True
        start.result()  # raises what stopped the start
        failed = asyncio.ensure_future(worker.wait_failed())
        await asyncio.wait({failed, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if failed.done():
            await worker.abort()
            raise failed.result()
        failed.cancel()
        graceful = asyncio.ensure_future(worker.stop())
        await asyncio.wait({graceful, now_wait}, return_when=asyncio.FIRST_COMPLETED)
        if graceful.done():
            return graceful.result()
        graceful.cancel()
        with contextlib.suppress(asyncio.CancelledError, SteadyRabbitError):
            await graceful
        await worker.abort()
    except ClosedByUserError:
        return True
    else:
        return False
    finally:
        stop_wait.cancel()
        now_wait.cancel()


def run(app: App, settings: Settings | None = None) -> bool:
    """Run ``app`` in a new event loop (uvloop when installed) until stopped by a signal.

    Returns True after a graceful stop, False after a forced one (second signal).
    """
    loop_factory = None
    try:
        import uvloop
    except ImportError:
        pass
    else:
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(serve(app, settings))
