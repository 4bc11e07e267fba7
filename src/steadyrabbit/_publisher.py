"""Confirmed publishing of the copies steadyrabbit makes (dead letters), on its own connection.

A publishing connection can be blocked by a broker memory alarm, and a blocked connection is not
read at all, acks included; the consumers' connection never publishes, so an alarm cannot stall
their acks.
"""

from __future__ import annotations

import asyncio
import logging
import random

from ._amqp import AmqpChannel
from ._backoff import backoff_delay
from ._errors import (
    ChannelClosedError,
    ConnectionLostError,
    MessageReturnedError,
    PublishRefusedError,
)
from ._properties import Properties
from ._supervisor import Supervisor
from ._topology import OwnQueue, declare_own_queue

log = logging.getLogger("steadyrabbit")

# Publishes a channel-level refusal (403/406) gets before it counts as this message's.
_REFUSALS = 3


class Publisher:
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

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
