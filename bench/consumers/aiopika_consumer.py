"""aio-pika: connect_robust, channel.set_qos(prefetch), queue.consume(callback), message.ack().

aio-pika runs every delivery's callback as its own task, so up to ``prefetch`` handlers run at
once. The blocking workload (W3) hands ``time.sleep`` to a pool of ``concurrency`` threads with
``loop.run_in_executor``. ``spec["loop"]`` picks the event loop: "asyncio" (the default loop)
or "uvloop".
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aio_pika
from _probe import Probe
from aio_pika.abc import AbstractIncomingMessage


def run(spec: dict[str, Any], probe: Probe) -> dict[str, Any]:
    factory = None
    if spec.get("loop") == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_consume(spec, probe))
    return {"loop": "uvloop" if factory else "asyncio"}


async def _consume(spec: dict[str, Any], probe: Probe) -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    kind = spec["handler"]
    delay = float(spec.get("sleep", 0.0))
    pool = ThreadPoolExecutor(int(spec["concurrency"])) if kind == "sync_sleep" else None
    on_message: Callable[[AbstractIncomingMessage], Awaitable[None]]

    if kind == "sync_sleep":

        async def on_message(message: AbstractIncomingMessage) -> None:
            probe.start()
            await loop.run_in_executor(pool, time.sleep, delay)
            probe.handled()
            await message.ack()
            if probe.acked():
                done.set()

    elif kind == "async_sleep":

        async def on_message(message: AbstractIncomingMessage) -> None:
            probe.start()
            await asyncio.sleep(delay)
            probe.handled()
            await message.ack()
            if probe.acked():
                done.set()

    elif kind == "json":

        async def on_message(message: AbstractIncomingMessage) -> None:
            probe.start()
            json.loads(message.body).get("id")
            probe.handled()
            await message.ack()
            if probe.acked():
                done.set()

    else:

        async def on_message(message: AbstractIncomingMessage) -> None:
            probe.start()
            probe.handled()
            await message.ack()
            if probe.acked():
                done.set()

    connection = await aio_pika.connect_robust(spec["url"], timeout=5)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=int(spec["prefetch"]))
        queue = await channel.get_queue(spec["queue"], ensure=True)
        tag = await queue.consume(on_message)
        await done.wait()
        await queue.cancel(tag)
    if pool is not None:
        pool.shutdown(wait=False)
