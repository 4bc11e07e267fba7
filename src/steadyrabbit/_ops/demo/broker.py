"""The demo's own operations on the broker: reset its topology, publish the backlog, count
what is queued and read the dead letters back."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from ..._amqp import NOT_FOUND, AmqpChannel, AmqpConnection
from ..._errors import ChannelClosedError, ConfigurationError
from ..._headers import REASON
from ..._properties import Properties
from ..._topology import bind_queue, ensure_exchange, ensure_queue
from .result import DeadLetterInfo
from .service import contract_number

__all__ = ["DemoBroker", "Progress"]

#: Called with (messages published so far, backlog): once before the first message and after
#: each one the broker confirmed.
Progress = Callable[[int, int], None]


class DemoBroker:
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
        self, exchange: str, routing_key: str, ids: Sequence[str], progress: Progress | None
    ) -> None:
        """Publish one JSON contract per id, each confirmed before the next; report each to
        ``progress``."""
        channel = await self._connection.channel()
        try:
            await channel.enable_confirms()
            if progress is not None:
                progress(0, len(ids))
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
                    Properties(
                        content_type="application/json",
                        delivery_mode=2,
                        message_id=message_id,
                    ),
                )
                if progress is not None:
                    progress(n, len(ids))
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
                last_tag, props, _body = got
                message_id = str(props.message_id or "?")
                reason = props.headers.get(REASON)
                if isinstance(reason, bytes):
                    reason = reason.decode("utf-8", "replace")
                letters.setdefault(
                    message_id,
                    DeadLetterInfo(message_id, contract_number(message_id), str(reason or "?")),
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
