"""Confirmed publishing on a connection of its own: the copies steadyrabbit makes (retries, dead
letters, hand-off markers) and the messages users publish (:mod:`._publishing`).

A publishing connection can be blocked by a broker memory alarm, and a blocked connection is not
read at all, acks included; the consumers' connection never publishes, so an alarm cannot stall
their acks.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import replace

from ._amqp import NOT_FOUND, AmqpChannel
from ._backoff import backoff_delay
from ._errors import (
    ChannelClosedError,
    ConnectionLostError,
    MessageReturnedError,
    PublishRefusedError,
    UnroutableError,
)
from ._properties import Properties
from ._supervisor import Supervisor
from ._topology import (
    DELAY_EXCHANGE,
    DELAY_HEADER,
    OwnQueue,
    bind_queue,
    declare_own_queue,
    delay_queue,
    delay_route,
)

log = logging.getLogger("steadyrabbit")

# Publishes a channel-level refusal (403/406) gets before it counts as this message's.
_REFUSALS = 3


class ConfirmedPublisher:
    """Publishes on one confirm channel of ``supervisor``'s connection, reopened as needed."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor
        self._channel: AmqpChannel | None = None
        self._opening: asyncio.Lock = asyncio.Lock()
        self._declared: set[str] = set()

    async def _confirm_channel(self) -> AmqpChannel:
        async with self._opening:
            channel = self._channel
            if channel is not None and channel.is_open:
                return channel
            return await self._open_confirm_channel()

    async def _open_confirm_channel(self) -> AmqpChannel:
        connection = await self._supervisor.connection()
        channel = await connection.channel()
        await channel.enable_confirms()
        self._channel = channel
        self._declared = set()
        return channel

    async def publish_to_queue(
        self, queue: OwnQueue, body: bytes, properties: Properties
    ) -> None:
        """Publish to ``queue`` (one of steadyrabbit's own) and return once the broker confirmed.

        Retries through connection and channel failures with backoff, so the caller can ack
        the original only after this returns: the message is never in zero places. Raises
        :class:`PublishRefusedError` when the broker refuses this very message (a nack, or a
        403/406 again on a fresh channel): retrying it would never end.
        """
        attempt = 0
        refusals = 0
        while True:
            try:
                channel = await self._confirm_channel()
                if queue.name not in self._declared:
                    await declare_own_queue(channel, queue)
                    self._declared.add(queue.name)
                await channel.publish_confirmed("", queue.name, body, properties)
            except PublishRefusedError as exc:
                # A nack names this message. A channel closed with 403/406 fails every publish
                # in flight on it, maybe because of another one: try again on a fresh channel
                # before calling it this message's refusal. Never a loop.
                refusals += 1
                if exc.reply_code is None or refusals >= _REFUSALS:
                    raise
                log.warning("publishing to %r was refused (%s); trying once more", queue.name, exc)
            except (ConnectionLostError, ChannelClosedError, MessageReturnedError) as exc:
                # Declare again next time: the queue may have been deleted under us (a
                # returned copy says so; the channel stays open then).
                self._declared.discard(queue.name)
                delay = backoff_delay(attempt, base=0.2, cap=10.0, random=random.random)
                attempt += 1
                if isinstance(exc, MessageReturnedError):
                    what = f"the broker returned it as unroutable ({exc.reply_code} " \
                        f"{exc.reply_text}: the queue is gone); declaring it again"
                else:
                    what = f"failed ({exc})"
                log.warning("publishing to %r %s; retrying in %.1f s", queue.name, what, delay)
                await asyncio.sleep(delay)
            else:
                return

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Properties,
        *,
        delay_ms: int | None = None,
    ) -> None:
        """Publish as mandatory and return once the broker confirmed it, through reconnects.

        A publish whose confirm was lost with its connection is sent again on the next one: a
        duplicate is possible, a loss is not. Raises :class:`UnroutableError` when no queue
        can take it (its exchange is missing, or no binding matched) and
        :class:`PublishRefusedError` when the broker refuses it; the caller bounds the time.
        ``delay_ms`` holds it in steadyrabbit's delay queue of that exchange first.
        """
        attempt = 0
        refusals = 0
        while True:
            try:
                channel = await self._confirm_channel()
                if delay_ms is None:
                    await channel.publish_confirmed(exchange, routing_key, body, properties)
                else:
                    await self._ensure_delay(channel, exchange, routing_key, delay_ms)
                    headers = {**properties.headers, DELAY_HEADER: delay_route(exchange, delay_ms)}
                    await channel.publish_confirmed(
                        DELAY_EXCHANGE, routing_key, body, replace(properties, headers=headers)
                    )
            except PublishRefusedError as exc:
                refusals += 1  # see publish_to_queue: a close may have been another's refusal
                if exc.reply_code is None or refusals >= _REFUSALS:
                    raise
            except ChannelClosedError as exc:
                # A publish to a missing exchange closes the channel with 404, failing every
                # publish in flight on it: only the one that named the exchange is at fault.
                if exc.reply_code == NOT_FOUND and f"exchange '{exchange}'" in exc.reply_text:
                    raise UnroutableError(
                        f"exchange {exchange!r} does not exist ({exc.reply_text})"
                    ) from exc
                attempt = await self._pause(attempt, exchange, exc)
            except ConnectionLostError as exc:
                attempt = await self._pause(attempt, exchange, exc)
            else:
                return

    async def _pause(self, attempt: int, exchange: str, exc: Exception) -> int:
        delay = backoff_delay(attempt, base=0.2, cap=10.0, random=random.random)
        log.warning(
            "publishing to exchange %r failed (%s); retrying in %.1f s", exchange, exc, delay
        )
        await asyncio.sleep(delay)
        return attempt + 1

    async def _ensure_delay(
        self, channel: AmqpChannel, exchange: str, routing_key: str, delay_ms: int
    ) -> None:
        """Declare what a delayed publish goes through, once per channel: the delay exchange,
        the delay queue and its binding, after checking that the target exists (a dead-lettered
        message that cannot be routed is dropped by the broker, so it is checked here)."""
        queue = delay_queue(exchange, delay_ms)
        target = ("queue", routing_key) if exchange == "" else ("exchange", exchange)
        declared = self._declared
        try:
            if f"{target[0]}:{target[1]}" not in declared:
                if exchange == "":
                    await channel.declare_queue(routing_key, durable=True, passive=True)
                else:
                    await channel.declare_exchange(exchange, "direct", durable=True, passive=True)
                declared.add(f"{target[0]}:{target[1]}")
        except ChannelClosedError as exc:
            if exc.reply_code == NOT_FOUND:
                raise UnroutableError(
                    f"{target[0]} {target[1]!r} does not exist: a delayed message could "
                    f"not be delivered to it"
                ) from exc
            raise
        if queue.name not in declared:
            await channel.declare_exchange(DELAY_EXCHANGE, "headers", durable=True)
            await declare_own_queue(channel, queue)
            await bind_queue(
                channel,
                queue.name,
                DELAY_EXCHANGE,
                "",
                {"x-match": "all", DELAY_HEADER: delay_route(exchange, delay_ms)},
            )
            declared.add(queue.name)

    @property
    def blocked(self) -> bool | None:
        """Whether the broker blocks this publisher's connection (a memory or disk alarm);
        None while there is no connection."""
        connection = self._supervisor.connected
        return None if connection is None else connection.blocked

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
