"""steadyrabbit, through its public API only: App, Worker, Settings.

Like ``steadyrabbit.run``, it runs on uvloop when uvloop is installed. Async handlers run as
tasks (``concurrency`` at once), a sync handler in steadyrabbit's own thread pool of
``concurrency`` threads. ``worker.stats.acked`` tells when the last ack went out.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _probe import Probe

from steadyrabbit import App, Message, Settings, Worker

_ACK_POLL_S = 0.0005


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
    handler: Callable[[Message], Any]

    if kind == "sync_sleep":

        def handler(message: Message) -> None:  # runs in steadyrabbit's thread pool
            probe.start()
            time.sleep(delay)
            if probe.handled():
                loop.call_soon_threadsafe(all_handled.set)

    elif kind == "async_sleep":

        async def handler(message: Message) -> None:
            probe.start()
            await asyncio.sleep(delay)
            if probe.handled():
                all_handled.set()

    elif kind == "json":

        async def handler(message: Message) -> None:
            probe.start()
            message.payload.get("id")  # decoded by steadyrabbit (decode="json")
            if probe.handled():
                all_handled.set()

    else:

        async def handler(message: Message) -> None:
            probe.start()
            if probe.handled():
                all_handled.set()

    app = App()
    app.add_consumer(
        handler,
        spec["queue"],
        concurrency=int(spec["concurrency"]),
        prefetch=int(spec["prefetch"]),
        decode="json" if kind == "json" else None,
    )
    with tempfile.TemporaryDirectory(prefix="steadyrabbit-bench-") as state_dir:
        settings = Settings(
            urls=(spec["url"],),
            connect_timeout=5.0,
            grace_period=5.0,
            name="steadyrabbit-bench",
            state_dir=Path(state_dir),
        )
        async with Worker(app, settings) as worker:
            await all_handled.wait()
            # stats.acked is a plain counter: poll it (only once the last handler ended).
            while worker.stats.acked < probe.messages:  # noqa: ASYNC110
                await asyncio.sleep(_ACK_POLL_S)
            await asyncio.sleep(0)  # an ack counted in this loop turn may be sent at its end
            probe.finish()
