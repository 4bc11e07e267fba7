"""Confirmed publishing of the copies steadyrabbit makes (dead letters), on its own connection.

A publishing connection can be blocked by a broker memory alarm, and a blocked connection is not
read at all, acks included; the consumers' connection never publishes, so an alarm cannot stall
their acks.
"""

from __future__ import annotations

import asyncio
import logging
import random

import pika.spec

from ._amqp import AmqpChannel
from ._backoff import backoff_delay
from ._errors import ChannelClosedError, ConnectionLostError
from ._supervisor import Supervisor
from ._topology import OwnQueue, declare_own_queue

log = logging.getLogger("steadyrabbit")


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
        self, queue: OwnQueue, body: bytes, properties: pika.spec.BasicProperties
    ) -> None:
        """Publish to ``queue`` (one of steadyrabbit's own) and return once the broker confirmed.

        Retries through connection and channel failures with backoff, so the caller can ack
        the original only after this returns: the message is never in zero places.
        """
        attempt = 0
        while True:
            try:
                channel = await self._confirm_channel()
                if queue.name not in self._declared:
                    await declare_own_queue(channel, queue)
                    self._declared.add(queue.name)
                await channel.publish_confirmed("", queue.name, body, properties)
            except (ConnectionLostError, ChannelClosedError) as exc:
                # Declare again next time: the queue may have been deleted under us.
                self._declared.discard(queue.name)
                delay = backoff_delay(attempt, base=0.2, cap=10.0, random=random.random)
                attempt += 1
                log.warning(
                    "publishing to %r failed (%s); retrying in %.1f s", queue.name, exc, delay
                )
                await asyncio.sleep(delay)
            else:
                return

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
