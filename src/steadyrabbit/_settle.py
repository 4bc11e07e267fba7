"""Settlement: carrying out a decision on the channel that delivered the message.

One place keeps the rules every outcome obeys, whatever a middleware does:

- an ack (or nack) goes only to the channel that delivered the message, and only while it is
  open; after that the broker has requeued the delivery and the ack is dropped, counted;
- a retry or dead-letter copy is confirmed by the broker before the original is acked: never in
  zero places. If the delivering channel dies first, the copy goes on and the redelivered
  original is settled by it, not copied again;
- a copy the broker refuses is a decision, never a loop: a refused retry becomes a dead letter,
  a refused dead letter stops the worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from time import monotonic
from typing import Any

from . import _headers
from ._aio import finish
from ._app import HandlerSpec
from ._decision import Decision, Outcome, retry_bucket_ms
from ._errors import (
    ConnectionLostError,
    PermanentBrokerError,
    PublishRefusedError,
    SteadyRabbitError,
)
from ._message import (
    Message,
    Properties,
    delivery_channel,
    fingerprint,
    log_event,
    persistent_copy,
    wire_headers,
)
from ._middleware import Hooks, Publish
from ._publisher import ConfirmedPublisher
from ._stats import QueueCounts, Stats
from ._topology import OwnQueue, copy_queue

log = logging.getLogger("steadyrabbit")


class Settlement:
    """Settles one consumer's messages (see the module documentation)."""

    def __init__(
        self,
        spec: HandlerSpec,
        publisher: ConfirmedPublisher,
        hooks: Hooks,
        counts: QueueCounts,
        stats: Stats,
        fatal: asyncio.Future[SteadyRabbitError],
        vhost: str,
        consumer_timeout: float,
    ) -> None:
        self.spec = spec
        self._publisher = publisher
        self._hooks = hooks
        self.counts = counts
        self._stats = stats
        self._fatal = fatal
        self._vhost = vhost
        self._retry = spec.retry
        # A copy nobody claimed within two consumer_timeouts belongs to an original that went
        # elsewhere (another worker took the redelivery).
        self._keep_unclaimed = 2 * consumer_timeout
        # Copies whose original's channel died before the broker confirmed them, by message
        # fingerprint: the redelivered original settles by that copy instead of a new one.
        self._copies: dict[str, _CopyInFlight] = {}
        # Messages with a message_id whose copy was confirmed and whose original was acked, by
        # fingerprint, for a few minutes: if that ack died with its connection, the redelivery
        # is acked by the copy instead of running (and being copied) a second time.
        self._acked_copies: dict[str, float] = {}

    async def settle_redelivery(self, message: Message, key: str) -> bool:
        """Settle a redelivered message by a copy already made of it; False if there is none
        (the message is to run)."""
        copy = self._copies.pop(key, None)
        if copy is not None:
            await self._settle_by_copy(message, key, copy)
            return True
        if self._acked_copies.pop(key, None) is None:
            return False
        if self.settle(message, ack=True):
            self.counts.resettled += 1
            log.info(
                "acked %r without running it: its copy was confirmed and its ack was lost "
                "with the connection",
                message,
            )
        return True

    async def close(self) -> None:
        """Copies still on their way get a moment to be confirmed."""
        copies = [c.publish for c in self._copies.values()]
        self._copies.clear()
        await finish(copies, _CLOSE_PATIENCE)

    def settle(self, message: Message, *, ack: bool, requeue: bool = False) -> bool:
        """Ack (or nack) on the channel that delivered the message, if it is still alive.

        Delivery tags belong to their channel: after that channel closed, the broker has
        requeued the delivery, and the same tag on another channel would ack another message.
        """
        if message.settled:
            # Settled once already: acked when it was handed off (its marker stands for the
            # run), or by its run while the hand-off was publishing. A tag settled twice
            # closes the channel (406 unknown delivery tag).
            return True
        channel = delivery_channel(message)
        if not channel.closed.done():  # the cheapest liveness test: a C call
            try:
                if ack:
                    channel.ack(message.delivery_tag)
                    self.counts.acked += 1
                else:
                    channel.nack(message.delivery_tag, requeue=requeue)
            except ConnectionLostError:
                pass  # the channel died under us: the same as finding it closed
            else:
                message.settled = True
                return True
        self._stats.stale_settlements_dropped += 1
        log.info(
            "dropped the %s of %r: its channel is gone and the broker has requeued it",
            "ack" if ack else "nack",
            message,
        )
        return False

    def requeue(self, message: Message) -> None:
        self.settle(message, ack=False, requeue=True)

    async def carry_out(self, message: Message, decision: Decision) -> bool:
        """Retry or dead-letter: publish a copy, wait for the broker's confirm, then ack.

        The message is never in zero places. If the delivering channel dies first, the copy
        goes on without it and the redelivered original settles by it (no second copy). A
        retry copy the broker refuses becomes a dead letter; a refused dead letter stops the
        worker. True once the original is acked.
        """
        channel = delivery_channel(message)
        if not channel.is_open and not message.handed_off:
            return self.settle(message, ack=False)  # counts and logs the stale delivery
        spec = self.spec
        target = copy_queue(spec.queue, spec.queue_type, retry_bucket_ms(decision, self._retry))
        decision = replace(decision, target=target.name)
        properties = self._copy_properties(message, decision)
        if self._hooks.around_publish:
            publishing = self._publish_through_middleware(target, message, properties)
        else:
            publishing = self._publisher.publish_to_queue(target, message.body, properties)
        publish = asyncio.ensure_future(publishing)
        return await self._settle_by_copy(message, None, _CopyInFlight(decision, publish))

    async def hand_off(self, message: Message, lease: Mapping[str, str], delay: float) -> bool:
        """Leave a marker for a run that goes on, then ack its delivery (see :mod:`._leases`).

        The marker is a copy of the message with the lease's key and token in its headers,
        published to the retry queue of ``delay`` and confirmed before the ack, so the message
        is never in zero places. True once acked: the broker's ``consumer_timeout`` no longer
        runs for it, and nothing acks it again. False if the delivering channel is gone (the
        broker redelivers the message; the lease makes that copy wait for this run).
        """
        if message.settled or not delivery_channel(message).is_open:
            return message.handed_off
        headers = _headers.for_marker(wire_headers(message))
        headers.update(
            {
                _headers.QUEUE: self.spec.queue,
                _headers.EXCHANGE: message.exchange,
                _headers.ROUTING_KEY: message.routing_key,
                **lease,
            }
        )
        target = copy_queue(self.spec.queue, self.spec.queue_type, max(1, round(delay * 1000)))
        properties = persistent_copy(message.properties, headers)
        if self._hooks.around_publish:
            await self._publish_through_middleware(target, message, properties)
        else:
            await self._publisher.publish_to_queue(target, message.body, properties)
        if message.settled:
            return False  # its run ended and settled it while the marker was published
        if not self.settle(message, ack=True):
            return False
        message.handed_off = True
        self.counts.handed_off += 1
        return True

    async def _publish_through_middleware(
        self, target: OwnQueue, message: Message, properties: Properties
    ) -> None:
        async def publish(copy: Publish) -> None:
            await self._publisher.publish_to_queue(
                target, copy.body, replace(properties, headers=copy.headers)
            )

        copy = Publish(
            "",
            target.name,
            message.body,
            dict(properties.headers),
            message_id=properties.message_id,
            copy=True,
            of=message,
        )
        await self._hooks.wrap_publish(publish)(copy)

    def _copy_properties(self, message: Message, decision: Decision) -> Properties:
        old = wire_headers(message) or {}
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        copy_headers = _headers.without_ours(old)
        copy_headers.update(
            {
                _headers.ATTEMPTS: decision.attempt,
                _headers.FIRST_FAILED_AT: old.get(_headers.FIRST_FAILED_AT, now),
                _headers.FAILED_AT: now,
                _headers.REASON: decision.reason,
                _headers.EXCEPTION: decision.error_type,
                _headers.QUEUE: self.spec.queue,
                _headers.EXCHANGE: message.exchange,
                _headers.ROUTING_KEY: message.routing_key,
            }
        )
        return persistent_copy(message.properties, copy_headers)

    async def _settle_by_copy(
        self, message: Message, key: str | None, copy: _CopyInFlight
    ) -> bool:
        """Wait for ``copy`` (of this message) to be confirmed, then ack ``message``.

        ``key`` is the message's fingerprint when known. If the channel dies first, the copy is
        kept for the redelivery; if the broker refused the copy, the message is dead-lettered
        (a refused retry) or the worker stops (a refused dead letter). True once acked.
        """
        channel = delivery_channel(message)
        publish = copy.publish
        if not publish.done() and message.handed_off:
            # Acked already: the copy is the only place the outcome goes, whatever the channel.
            await asyncio.wait({publish})
        if not publish.done():
            channel_closed = asyncio.shield(channel.closed)
            racers: set[asyncio.Future[Any]] = {publish, channel_closed}
            try:
                await asyncio.wait(racers, return_when=asyncio.FIRST_COMPLETED)
            finally:
                channel_closed.cancel()
        if publish.done():
            error = None if publish.cancelled() else publish.exception()
            if isinstance(error, PublishRefusedError):
                return await self._copy_refused(message, copy, error)
            if isinstance(error, PermanentBrokerError):
                log.error("could not copy %r to %r: %s", message, copy.decision.target, error)
                if not self._fatal.done():
                    self._fatal.set_result(error)
                return False
            if error is not None:
                raise error
            if publish.cancelled():
                return self.settle(message, ack=False)  # the worker is closing
        if not publish.done() or not self.settle(message, ack=True):
            # The original is back in the queue; the copy (landed or still on its way) stands
            # for it: its redelivery is acked by this copy, not copied again.
            self._keep_copy(key or fingerprint(message, self._vhost), copy)
            return False
        self._copy_done(message, copy)
        if message.message_id:
            # Only an id says for sure that a redelivery is this message, not its twin.
            self._remember_acked_copy(key or fingerprint(message, self._vhost))
        return True

    def _copy_done(self, message: Message, copy: _CopyInFlight) -> None:
        decision = copy.decision
        fields = log_event(
            "retrying" if decision.outcome is Outcome.RETRY else "dead-lettered",
            message,
            attempt=decision.attempt,
            outcome=decision.outcome.value,
            error_type=decision.error_type,
            reason=decision.reason,
            target=decision.target,
        )
        if decision.outcome is Outcome.RETRY:
            self.counts.retried += 1
            log.info(
                "retrying %r via %r (%s)", message, decision.target, decision.reason, extra=fields
            )
        else:
            self.counts.dead_lettered += 1
            log.warning(
                "dead-lettered %r to %r: %s",
                message,
                decision.target,
                decision.reason,
                extra=fields,
            )
        if self._hooks.settled:
            self._hooks.on_settled(message, decision)

    def _keep_copy(self, key: str, copy: _CopyInFlight) -> None:
        # Expired copies go first; the dict's insertion order is their age.
        now = monotonic()
        copies = self._copies
        while copies:
            oldest = next(iter(copies))
            if copies[oldest].kept_at + self._keep_unclaimed >= now:
                break
            abandoned = copies.pop(oldest).publish
            abandoned.cancel()  # its original was settled elsewhere: nothing waits for it
            abandoned.add_done_callback(_retrieve)
        copy.kept_at = now
        copies.pop(key, None)
        copies[key] = copy

    def _remember_acked_copy(self, key: str) -> None:
        remembered = self._acked_copies
        now = monotonic()
        while remembered:
            oldest = next(iter(remembered))
            if remembered[oldest] + _LOST_ACK_WINDOW >= now and len(remembered) < _LOST_ACK_KEYS:
                break
            del remembered[oldest]
        remembered.pop(key, None)
        remembered[key] = now

    async def _copy_refused(
        self, message: Message, copy: _CopyInFlight, error: PublishRefusedError
    ) -> bool:
        refused = copy.decision
        if refused.outcome is Outcome.RETRY:
            log.warning(
                "the broker refused the retry copy of %r to %r (%s); dead-lettering it instead",
                message,
                refused.target,
                error,
            )
            reason = f"{refused.reason} (the retry copy to {refused.target} was refused: {error})"
            return await self.carry_out(
                message,
                replace(refused, outcome=Outcome.DEAD_LETTER, reason=reason, delay=None),
            )
        stop = PublishRefusedError(
            f"the broker refused the dead letter of a message of {self.spec.queue!r} to "
            f"{refused.target!r} ({error}): check that queue's policies (a max-length with "
            "reject-publish?) and the user's write permission; the message stays in its queue",
            reply_code=error.reply_code,
        )
        log.error("%s", stop)
        if not self._fatal.done():
            self._fatal.set_result(stop)
        return False


_CLOSE_PATIENCE = 5.0
# A redelivery after an ack lost with its connection comes once the broker noticed the loss
# (two heartbeats) and the worker reconnected: well within this. Entries kept at most.
_LOST_ACK_WINDOW = 300.0
_LOST_ACK_KEYS = 10_000


class _CopyInFlight:
    """A retry or dead-letter copy being published for a message, and the decision it carries
    out (its ``target`` set)."""

    __slots__ = ("decision", "kept_at", "publish")

    def __init__(self, decision: Decision, publish: asyncio.Future[None]) -> None:
        self.decision = decision
        self.publish = publish
        self.kept_at = 0.0


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
