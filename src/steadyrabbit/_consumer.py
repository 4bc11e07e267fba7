"""A consumer: one queue, one handler, one channel at a time, and every message's outcome."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from time import monotonic
from types import CodeType
from typing import Any

from ._aio import finish
from ._amqp import (
    ACCESS_REFUSED,
    NOT_FOUND,
    AmqpChannel,
    AmqpConnection,
    Deliver,
    WireProperties,
)
from ._app import ExchangeBinding, HandlerSpec
from ._backoff import backoff_delay
from ._decision import decide
from ._errors import (
    AccessRefusedError,
    ChannelClosedError,
    ClosedByUserError,
    ConnectionLostError,
    HandlerExit,
    Reject,
    Retry,
    SteadyRabbitError,
    is_consumer_timeout,
)
from ._gate import HANDOFF_SHARE, UNSTARTED_PATIENCE_SHARE, NotAdmitted, SoloGate
from ._message import (
    Message,
    delivery_channel,
    fingerprint,
    log_event,
    one_line,
    wire_headers,
)
from ._middleware import Hooks
from ._publisher import ConfirmedPublisher
from ._publishing import BlockingPublisher, BrokerTransport, Publisher
from ._settings import Settings
from ._settle import Settlement
from ._stats import QueueCounts, Stats
from ._supervisor import Supervisor
from ._topology import (
    bind_exchange,
    bind_queue,
    consumer_timeout_argument,
    dead_letter_queue,
    declare_own_queue,
    ensure_exchange,
    ensure_queue,
    retry_queue,
)
from ._window import AdaptiveWindow, wait_budget

log = logging.getLogger("steadyrabbit")

# After an async handler blocked the event loop, how long to let the connection show whether it
# survived (the broker's close is already waiting in the socket) before settling.
_STALL_SETTLE = 0.5


class Consumer:
    """Consumes one queue with one handler.

    ``run`` keeps a consuming channel for as long as the worker lives: after a reconnect, a
    channel closed by the broker or a ``basic.cancel`` it restores, in order, channel, QoS,
    exchange, queue, dead-letter queue, binding and consumer, then sets ``ready``.
    """

    def __init__(
        self,
        spec: HandlerSpec,
        supervisor: Supervisor,
        publisher: ConfirmedPublisher,
        settings: Settings,
        stats: Stats,
        gate: SoloGate,
        hooks: Hooks,
        exchange_bindings: Sequence[ExchangeBinding] = (),
    ) -> None:
        self.spec = spec
        self._exchange_bindings = tuple(exchange_bindings)
        self._supervisor = supervisor
        self._publisher = publisher
        self._settings = settings
        self._stats = stats
        #: This queue's per-message counters; ``stats`` sums every consumer's.
        self.counts = QueueCounts()
        stats.queues.append(self.counts)
        self._hooks = hooks
        # What a handler publishes goes out on the worker's publishing connection, through
        # this consumer's around_publish middleware.
        bound = Publisher.over(BrokerTransport(publisher), hooks)
        self._publishers = (bound, BlockingPublisher.over(bound, asyncio.get_running_loop()))
        # The handler inside every around_handler middleware, composed once: with none, the
        # handler itself, and a message costs nothing more.
        self._handler = hooks.wrap_handler(spec.handler)
        self._decode = spec.decode
        self._concurrency = spec.concurrency
        self.ready = asyncio.Event()
        self._channel: AmqpChannel | None = None
        self._consumer_tag: str | None = None
        self._cancelled_by_broker = asyncio.Event()
        self._stopping = asyncio.Event()
        self._refusing = False  # = self._stopping.is_set(), read once per delivery
        self._queue = spec.queue
        self._create_task = asyncio.get_running_loop().create_task
        self._fatal: asyncio.Future[SteadyRabbitError] = asyncio.get_running_loop().create_future()
        self._waiting: deque[Message] = deque()
        self._running = 0
        # Each running message's task; its done callback frees the slot.
        self._tasks: dict[asyncio.Task[Any], Message] = {}
        self._aged_timer: asyncio.TimerHandle | None = None
        self._aged_after = settings.consumer_timeout * UNSTARTED_PATIENCE_SHARE
        # Without a prefetch of its own, the window follows the handlers' durations, and a
        # message that waited its budget unstarted goes back (see _window).
        self._adaptive: AdaptiveWindow | None = None
        self._window_changed = asyncio.Event()
        self._window_sent = spec.prefetch  # the QoS of the current channel
        if spec.adaptive_prefetch:
            budget = wait_budget(settings.consumer_timeout)
            self._adaptive = AdaptiveWindow(spec.concurrency, budget)
            # A little before the budget: timers and the loop's turn add their share.
            self._aged_after = min(self._aged_after, budget * 0.9)
        self._handoff_after = settings.consumer_timeout * HANDOFF_SHARE
        self._retry = spec.retry
        self._dead_letter_queue = dead_letter_queue(spec.queue, spec.queue_type)
        self._vhost = settings.addresses[0].vhost
        self._gate = gate
        gate.watch(self)
        # Redeliveries go through every around_redelivery middleware (composed once), or
        # straight to the handler when there is none.
        self._redelivered = (
            hooks.wrap_redelivery(self._settle_redelivered) if hooks.around_redelivery else None
        )
        self._reached_settlement: set[Message] = set()
        self._settlement = Settlement(
            spec,
            publisher,
            hooks,
            self.counts,
            stats,
            self._fatal,
            self._vhost,
            settings.consumer_timeout,
        )
        # The messages between start and settlement, and when each started; kept only with
        # an observer asked for them (track_running).
        self._processing: dict[Message, float] | None = None

    # -- channel lifecycle ------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until :meth:`stop_consuming`; raise only a permanent error."""
        failures = 0
        while not self._stopping.is_set():
            connection = await self._supervisor.connection()
            if self._stopping.is_set():
                return
            try:
                await self._attach(connection)
            except ChannelClosedError as exc:
                if exc.reply_code == ACCESS_REFUSED:
                    raise AccessRefusedError(
                        f"no permission to consume {self.spec.queue!r}: {exc.reply_text}"
                    ) from exc
                error: SteadyRabbitError | None = exc
            except ConnectionLostError as exc:
                error = exc
            else:
                error = None
            if self._stopping.is_set():
                # Shutdown began while subscribing: a live subscription now would only bounce
                # deliveries back to the queue.
                await self._unsubscribe()
                return
            if error is not None:
                delay = backoff_delay(
                    failures,
                    base=self._settings.reconnect_delay,
                    cap=self._settings.reconnect_delay_max,
                    random=random.random,
                )
                failures += 1
                log.warning(
                    "consumer of %r could not start (%s); retrying in %.1f s",
                    self.spec.queue,
                    error,
                    delay,
                )
                await self._sleep_unless_stopping(delay)
                continue
            failures = 0
            self.ready.set()
            log.info(
                "consuming %r with %s (concurrency %d, prefetch %d)",
                self.spec.queue,
                self.spec.name,
                self.spec.concurrency,
                self.spec.prefetch,
            )
            await self._until_interrupted()

    async def _attach(self, connection: AmqpConnection) -> None:
        spec = self.spec

        async def open_channel() -> AmqpChannel:
            channel = await connection.channel()
            window = self.prefetch_window
            await channel.qos(window)
            self._window_sent = window
            return channel

        channel = self._channel
        if channel is None or not channel.is_open:
            channel = await open_channel()
        if spec.exchange is not None:
            channel = await ensure_exchange(
                channel, open_channel, spec.exchange, spec.exchange_type
            )
        for binding in self._exchange_bindings:
            for exchange, kind in (
                (binding.source, binding.source_type),
                (binding.destination, binding.destination_type),
            ):
                channel = await ensure_exchange(channel, open_channel, exchange, kind)
            for routing_key in binding.routing_keys or ("",):
                await bind_exchange(
                    channel, binding.destination, binding.source, routing_key, binding.arguments
                )
        channel = await ensure_queue(
            channel, open_channel, spec.queue, spec.queue_type, single_active=spec.single_active
        )
        await declare_own_queue(channel, self._dead_letter_queue)
        for delay in spec.retry.delays or ():
            bucket = spec.retry.bucket_ms(delay)
            await declare_own_queue(channel, retry_queue(spec.queue, bucket, spec.queue_type))
        if spec.exchange is not None:
            for routing_key in spec.routing_keys:
                await bind_queue(
                    channel, spec.queue, spec.exchange, routing_key, spec.bind_arguments
                )
        self._cancelled_by_broker.clear()
        channel.on_broker_cancel(self._on_broker_cancel)
        self._channel = channel
        arguments: dict[str, Any] = {}
        if spec.priority is not None:
            arguments["x-priority"] = spec.priority
        # A declared time budget goes to the broker as this consumer's own timeout where it
        # takes one (3.12+: a consumer argument, no queue change). It is not relied on: RabbitMQ
        # 4.0.5 was measured to ignore it, and 3.10 does, so long runs are handed off all the
        # same (see _idempotency); where the argument holds, that costs one marker.
        if consumer_timeout_argument(connection.server_version, spec.max_duration):
            assert spec.max_duration is not None
            arguments["x-consumer-timeout"] = round(spec.max_duration * 1000)
        self._consumer_tag = await channel.consume(
            spec.queue, partial(self._on_message, channel), arguments or None
        )

    async def _until_interrupted(self) -> None:
        channel = self._channel
        assert channel is not None
        waiters: set[asyncio.Future[Any]] = {
            asyncio.shield(channel.closed),
            asyncio.ensure_future(self._cancelled_by_broker.wait()),
            asyncio.ensure_future(self._stopping.wait()),
        }
        if self._adaptive is not None:
            waiters.add(asyncio.ensure_future(self._keep_window(channel)))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Cancelled and awaited, the window keeper included (it may be inside a
            # basic.qos): none outlives this call, and an error of its own is raised here.
            await finish(waiters, patience=0)
        if self._stopping.is_set():
            return
        self.ready.clear()
        if channel.closed.done():
            self._on_channel_lost(channel, channel.closed.result())
        else:
            self._stats.consumer_cancels += 1
            self._hooks.on_consumer_cancelled(self.spec.queue)
            if self._outlived_timeout():
                # RabbitMQ 4.3 enforces a consumer timeout by cancelling the consumer, not by
                # closing the channel.
                log.error(
                    "the broker cancelled the consumer of %r: a delivery outlived its consumer "
                    "timeout; its unacked messages go back to the queue; re-subscribing",
                    self.spec.queue,
                )
            else:
                log.warning(
                    "the broker cancelled the consumer of %r (queue deleted or moved); "
                    "re-subscribing",
                    self.spec.queue,
                )

    async def _keep_window(self, channel: AmqpChannel) -> None:
        """Send each new window to the broker (basic.qos), for as long as ``channel`` lives."""
        assert self._adaptive is not None
        try:
            while True:
                # Set already if the window moved since the channel's QoS was sent.
                if self._adaptive.window == self._window_sent:
                    await self._window_changed.wait()
                self._window_changed.clear()
                window = self._adaptive.window
                if window != self._window_sent:
                    await channel.qos(window)
                    self._window_sent = window
                    log.info(
                        "prefetch of %r is now %d: %s",
                        self.spec.queue,
                        window,
                        self._adaptive.reason,
                    )
        except (ConnectionLostError, ChannelClosedError):
            # The channel is going: the consumer's other waiter reports it.
            await asyncio.shield(channel.closed)

    @property
    def prefetch_window(self) -> int:
        """The prefetch in force: the adaptive window, or the consumer's own prefetch."""
        return self.spec.prefetch if self._adaptive is None else self._adaptive.window

    @property
    def window_reason(self) -> str:
        if self._adaptive is None:
            return "set by the consumer or a default"
        return self._adaptive.reason

    def _on_broker_cancel(self, consumer_tag: str) -> None:
        if consumer_tag == self._consumer_tag:
            self._consumer_tag = None
            self._cancelled_by_broker.set()

    def _on_channel_lost(self, channel: AmqpChannel, reason: SteadyRabbitError) -> None:
        self._consumer_tag = None
        self._hooks.on_channel_lost(self.spec.queue, reason)
        # Deliveries of a closed channel are requeued by the broker: forget the unstarted ones.
        self._waiting = deque(m for m in self._waiting if delivery_channel(m) is not channel)
        if isinstance(reason, ChannelClosedError):
            self._stats.channel_recoveries += 1
            if is_consumer_timeout(reason):
                log.error(
                    "the broker closed the channel of %r because a delivery was not acknowledged "
                    "within its consumer_timeout (%s): a handler ran too long or messages waited "
                    "in prefetch; raise consumer_timeout on the broker or shorten the handler. "
                    "Unacked messages were requeued; reopening the channel",
                    self.spec.queue,
                    reason.reply_text,
                )
            elif reason.reply_code == NOT_FOUND:
                log.warning("queue %r is gone (%s); re-declaring", self.spec.queue, reason)
            else:
                log.warning("%s on the consumer of %r; reopening it", reason, self.spec.queue)

    async def _sleep_unless_stopping(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)

    # -- deliveries: the hot path -------------------------------------------------------------

    def _on_message(
        self,
        channel: AmqpChannel,
        _raw: Any,
        method: Deliver,
        properties: WireProperties,
        body: bytes,
    ) -> None:
        # Basic.Deliver always carries its tag; the stubs say Optional for every field.
        channel.unsettled.append(method.delivery_tag)  # type: ignore[arg-type]
        message = Message(channel, method, properties, body, self._queue, self._publishers)
        self.counts.delivered += 1
        if self._refusing:
            self._settlement.requeue(message)
            self._stats.requeued_unstarted += 1
        elif self._running < self._concurrency and not self._gate.closed:
            self._start(message)
        else:
            self._waiting.append(message)
            if self._aged_timer is None:
                self._arm_aged_timer()

    def _start(self, message: Message) -> None:
        self._running += 1
        processing = self._processing
        if processing is not None:
            processing[message] = monotonic()
        # The task runs the message's work itself, with no coroutine around it: the slot is
        # freed by the done callback (one per task either way).
        work = self._process_redelivered(message) if message.redelivered else self._run(message)
        task = self._create_task(work)
        self._tasks[task] = message
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        message = self._tasks.pop(task)
        if self._processing is not None:
            self._processing.pop(message, None)
        self._running -= 1
        if self._gate.closed:
            self._gate.finished()
        elif self._waiting and not self._refusing:
            self._start(self._waiting.popleft())

    def _outlived_timeout(self) -> bool:
        timeout = min(self._settings.consumer_timeout, self.spec.max_duration or math.inf)
        oldest = min((m.received_at for m in self._tasks.values()), default=None)
        return oldest is not None and monotonic() - oldest >= timeout

    # -- hand-offs of long runs (see _idempotency)

    @property
    def handoff_after(self) -> float | None:
        """Seconds after delivery at which a run still going is handed off."""
        return self._handoff_after

    def running_messages(self) -> Iterable[Message]:
        """The messages whose handlers run now (a view: copy it before awaiting)."""
        return self._tasks.values()

    async def hand_off(self, message: Message, lease: Mapping[str, str], delay: float) -> bool:
        """Leave a marker for ``message`` and ack it early (see :meth:`Settlement.hand_off`)."""
        return await self._settlement.hand_off(message, lease, delay)

    @staticmethod
    def handler_frames() -> tuple[CodeType, ...]:
        """The code whose frames run a handler with the message in a local ``message`` (for
        the loop-lag watchdog)."""
        return (Consumer._run.__code__,)

    def resume(self) -> None:
        """Start waiting messages in free slots (the solo gate opened)."""
        while (
            self._waiting
            and self._running < self._concurrency
            and not self._refusing
            and not self._gate.closed
        ):
            self._start(self._waiting.popleft())

    async def _process_redelivered(self, message: Message) -> None:
        """A redelivery: settle it by a copy already made, or run it inside every
        ``around_redelivery`` middleware (the built-in one counts crash loops)."""
        if await self._settlement.settle_redelivery(message, fingerprint(message, self._vhost)):
            return
        chain = self._redelivered
        if chain is None:
            await self._run(message)
            return
        try:
            await chain(message)
        except NotAdmitted:
            self._settlement.requeue(message)  # never started: no record, no blame
            self._stats.requeued_unstarted += 1
        except Exception as exc:
            if message in self._reached_settlement:
                log.exception("an around_redelivery middleware failed after settling %r", message)
            else:
                log.warning("an around_redelivery middleware failed on %r", message, exc_info=True)
                decision = decide(exc, wire_headers(message), self._retry)
                await self._settlement.carry_out(message, decision)
        finally:
            self._reached_settlement.discard(message)

    async def _settle_redelivered(
        self, message: Message, /, *, end_with: BaseException | None = None
    ) -> bool:
        """The innermost step of the ``around_redelivery`` chain: run the handler and settle,
        or settle as ``end_with`` decides without running it."""
        self._reached_settlement.add(message)
        if end_with is None:
            return await self._run(message)
        decision = decide(end_with, wire_headers(message), self._retry)
        return await self._settlement.carry_out(message, decision)

    def _log_failure(self, message: Message, error: BaseException, seconds: float) -> None:
        """One line per failed attempt; its traceback at debug level."""
        fields = log_event(
            "handler failed",
            message,
            error_type=type(error).__name__,
            duration=round(seconds, 6),
            handler=self.spec.name,
        )
        log.warning(
            "handler %s failed on %r (attempt %d, %.3f s): %s",
            self.spec.name,
            message,
            message.attempt,
            seconds,
            one_line(error),
            extra=fields,
        )
        log.debug("the failure of %r:", message, exc_info=error, extra=fields)

    async def _run(self, message: Message) -> bool:
        """Run the handler and settle the message by its outcome.

        True if the handler finished, whatever became of the settlement (an ack dropped because
        the channel closed on ``consumer_timeout`` is not a crash); False if the run counts as
        a crash: an async handler blocked the event loop and its connection died of it.
        """
        error: Exception | None = None
        started = monotonic()
        try:
            if self._decode is not None:
                try:
                    message.payload = self._decode(message.body)
                except Reject:
                    raise  # a typed payload that did not validate, with its errors
                except Exception as exc:
                    raise Reject(f"undecodable body: {type(exc).__name__}: {exc}") from exc
            await self._handler(message)
        except Exception as exc:  # noqa: BLE001 - the outcome of its message, logged below
            error = exc
            if not isinstance(exc, Reject | Retry):  # a handler's own decisions are no errors
                self._stats.handler_errors += 1
                self._log_failure(message, exc, monotonic() - started)
        except SystemExit as exc:
            # sys.exit() in an async handler: a failure of its message. Left alone, asyncio
            # would raise it out of the event loop and stop the worker. (A sync handler's is
            # turned into HandlerExit in its thread.)
            error = HandlerExit(exc)
            self._stats.handler_errors += 1
            self._log_failure(message, error, monotonic() - started)
        if self._adaptive is not None and self._adaptive.observe(monotonic() - started):
            self._window_changed.set()
        if message.blocked_loop and not await self._survived_stall(message):
            return False
        if error is None:
            if self._settlement.settle(message, ack=True) and self._hooks.settled:
                acked = decide(None, wire_headers(message), self._retry)
                self._hooks.on_settled(message, acked)
            return True
        decision = decide(error, wire_headers(message), self._retry)
        await self._settlement.carry_out(message, decision)
        return True

    async def _survived_stall(self, message: Message) -> bool:
        """After its handler blocked the event loop: is the delivering channel still alive?

        A stall past the heartbeat timeout kills the connection, but pika only notices once
        the loop reads the socket again. Settling at once would count an ack that never
        reaches the broker as a success and forget the start that killed the connection.
        """
        channel = delivery_channel(message)
        heartbeat = channel.connection.negotiated_heartbeat
        if not channel.closed.done():
            if heartbeat == 0 or message.blocked_loop < heartbeat:
                return True  # too short a stall to cost the connection: no need to look
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(channel.closed), _STALL_SETTLE)
        if not channel.closed.done():
            return True
        self._stats.stale_settlements_dropped += 1
        log.error(
            "the handler %s blocked the event loop for %.1f s on %r and its connection died of "
            "it; the broker will redeliver the message, and this start counts toward the "
            "crash-loop limit",
            self.spec.name,
            message.blocked_loop,
            message,
        )
        return False

    # -- prefetched messages that wait too long ------------------------------------------------

    def _arm_aged_timer(self) -> None:
        head = self._waiting[0]
        loop = asyncio.get_running_loop()
        when = loop.time() + max(0.0, head.received_at + self._aged_after - monotonic())
        self._aged_timer = loop.call_at(when, self._return_aged)

    def _return_aged(self) -> None:
        self._aged_timer = None
        limit = monotonic() - self._aged_after
        while self._waiting and self._waiting[0].received_at <= limit:
            message = self._waiting.popleft()
            self._settlement.requeue(message)
            self._stats.requeued_aged += 1
            if self._adaptive is not None:
                # The handlers slowed down under a window sized for faster ones: the window
                # has shrunk (or will at this run's end), and the message comes back later.
                log.info(
                    "returned %r to the queue unstarted: it waited %.2f s, its budget; "
                    "prefetch is now %d (%s)",
                    message,
                    monotonic() - message.received_at,
                    self._adaptive.window,
                    self._adaptive.reason,
                )
                continue
            log.warning(
                "returned %r to the queue unstarted: it waited %.0f s in prefetch, near the "
                "broker's consumer_timeout; lower prefetch",
                message,
                monotonic() - message.received_at,
            )
        if self._waiting:
            self._arm_aged_timer()

    # -- shutdown -----------------------------------------------------------------------------

    @property
    def fatal(self) -> asyncio.Future[SteadyRabbitError]:
        """Resolves with a permanent error met while handling messages."""
        return self._fatal

    @property
    def in_flight(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        """Prefetched messages waiting for a free handler slot."""
        return len(self._waiting)

    # -- what observers read (see _view.ConsumerView) -------------------------------------

    def track_running(self) -> None:
        """Keep the messages being processed and their start times (see :meth:`running`).
        Call before :meth:`run`; costs a dict update at each start and end of a message."""
        if self._processing is None:
            self._processing = {}

    def running(self) -> list[tuple[Message, float]]:
        """The messages being processed, each with when (``time.monotonic()``) it started;
        empty unless :meth:`track_running` was called."""
        return list((self._processing or {}).items())

    def oldest_unacked(self) -> float | None:
        """When (``time.monotonic()``) the oldest delivery not yet settled on its still open
        channel arrived: the one nearest to the broker's ``consumer_timeout``. None if there
        is none. Messages being processed count only once :meth:`track_running` was called.
        """
        oldest = next((m.received_at for m in self._waiting if m.settleable), None)
        for message in self._processing or ():
            if message.settleable and (
                oldest is None or message.received_at < oldest
            ):
                oldest = message.received_at
        return oldest

    async def stop_consuming(self) -> None:
        """Cancel the subscription and return every unstarted message to the queue at once."""
        self._stopping.set()
        self._refusing = True
        self.ready.clear()
        await self._unsubscribe()
        if self._aged_timer is not None:
            self._aged_timer.cancel()
            self._aged_timer = None
        while self._waiting:
            self._settlement.requeue(self._waiting.popleft())
            self._stats.requeued_unstarted += 1

    async def _unsubscribe(self) -> None:
        channel, tag = self._channel, self._consumer_tag
        self._consumer_tag = None
        if channel is not None and channel.is_open and tag is not None:
            with contextlib.suppress(ConnectionLostError, ChannelClosedError, ClosedByUserError):
                await asyncio.wait_for(channel.cancel(tag), timeout=5)

    async def drain(self, grace_period: float) -> bool:
        """Let running handlers finish; True if all did within ``grace_period`` seconds."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_period)
        return not self._tasks

    async def abort(self) -> None:
        """Stop at once: start nothing more, cancel running async handlers. Their messages,
        and the prefetched ones, stay unacked and come back when the channel closes."""
        self._stopping.set()
        self._refusing = True
        self.ready.clear()
        if self._aged_timer is not None:
            self._aged_timer.cancel()
            self._aged_timer = None
        self._waiting.clear()
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def close(self) -> None:
        """Close the channel; copies still on their way get a moment to be confirmed."""
        if self._channel is not None:
            self._channel.close()
        await self._settlement.close()
