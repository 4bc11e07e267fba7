"""FastStream: RabbitBroker and one subscriber on a Channel(prefetch_count=prefetch).

FastStream consumes through aio-pika, one task per delivery (so up to ``prefetch`` handlers at
once), decodes the body by its content type (the JSON workload is published as
application/json, so the handler gets the decoded object), runs a sync ``def`` handler in a
worker thread (anyio's pool) and acks after the handler returns (its default ack policy).
Like ``faststream run`` it uses uvloop when installed. Logging is off (``logger=None``).

The ack is FastStream's, after the handler: the handler cannot see it. So the handler keeps
the raw aio-pika messages of the last ``2 * prefetch`` deliveries, at most 1,000 (it finds the
current one in the broker's context, ``broker.context.get_local("message")``, which costs less
than injecting a ``RabbitMessage`` argument); once the last message was handled, the run ends
when every one of them reports ``processed`` (acked). A handled message is acked by its own task
right after its handler returns, so the unacked ones are among those; the parent checks that
the queue ends empty.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from _probe import Probe
from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

_ACK_POLL_S = 0.0005
_RECENT_MAX = 1000  # W5's window is 10,000: do not hold 20,000 messages


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(spec: dict[str, Any], probe: Probe) -> dict[str, Any]:
    factory = _loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_consume(spec, probe))
    return {"loop": "uvloop" if factory else "asyncio"}


async def _consume(spec: dict[str, Any], probe: Probe) -> None:
    loop = asyncio.get_running_loop()
    all_handled = asyncio.Event()
    kind = spec["handler"]
    delay = float(spec.get("sleep", 0.0))
    prefetch = int(spec["prefetch"])
    recent: deque[Any] = deque(maxlen=min(2 * prefetch, _RECENT_MAX))

    broker = RabbitBroker(spec["url"], logger=None, graceful_timeout=5.0)
    subscriber = broker.subscriber(
        RabbitQueue(spec["queue"], declare=False),
        channel=Channel(prefetch_count=prefetch),
    )

    if kind == "sync_sleep":

        @subscriber
        def handle(body: Any) -> None:  # FastStream: in a thread
            probe.start()
            time.sleep(delay)
            recent.append(broker.context.get_local("message").raw_message)
            if probe.handled():
                loop.call_soon_threadsafe(all_handled.set)

    elif kind == "async_sleep":

        @subscriber
        async def handle(body: Any) -> None:
            probe.start()
            await asyncio.sleep(delay)
            recent.append(broker.context.get_local("message").raw_message)
            if probe.handled():
                all_handled.set()

    elif kind == "json":

        @subscriber
        async def handle(body: Any) -> None:
            probe.start()
            body.get("id")  # decoded by FastStream (content type application/json)
            recent.append(broker.context.get_local("message").raw_message)
            if probe.handled():
                all_handled.set()

    else:

        @subscriber
        async def handle(body: Any) -> None:
            probe.start()
            recent.append(broker.context.get_local("message").raw_message)
            if probe.handled():
                all_handled.set()

    async with broker:
        await broker.start()
        await all_handled.wait()
        # Nothing signals FastStream's ack, so poll for it (only once the last handler ended).
        while not all(raw.processed for raw in list(recent)):  # noqa: ASYNC110
            await asyncio.sleep(_ACK_POLL_S)
        probe.finish()
