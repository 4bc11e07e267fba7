"""steadyrabbit, through its public API only: App, Worker, Settings.

Like ``steadyrabbit.run``, it runs on uvloop when uvloop is installed. Async handlers run as
tasks (``concurrency`` at once), a sync handler in steadyrabbit's own thread pool of
``concurrency`` threads. ``worker.stats.acked`` tells when the last ack went out.

``spec["idempotency"]`` (default True, as in ``Settings``) turns the ``Leases`` middleware on
or off. Each run has a fresh, empty ``state_dir``, where the SQLite lease store lives; after
the run the done records in it are counted (``done_records``), so the parent can tell that
messages with a ``message_id`` really went through the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
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


# Where SQLiteLeaseStore keeps its records in state_dir (steadyrabbit._idempotency.lease_store).
_LEASES_FILE = "leases.sqlite3"


def run(spec: dict[str, Any], probe: Probe) -> dict[str, Any]:
    factory = _loop_factory()
    idempotency = bool(spec.get("idempotency", True))
    with tempfile.TemporaryDirectory(prefix="steadyrabbit-bench-") as state_dir:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(_consume(spec, probe, Path(state_dir), idempotency))
        done_records = _done_records(Path(state_dir) / _LEASES_FILE)
    return {
        "loop": "uvloop" if factory else "asyncio",
        "idempotency": idempotency,
        "done_records": done_records,
    }


def _done_records(path: Path) -> int:
    """Done records in the SQLite lease store; 0 when it was never created."""
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(path)) as db:
        row = db.execute("SELECT count(*) FROM leases WHERE state = 'done'").fetchone()
    return int(row[0])


async def _consume(spec: dict[str, Any], probe: Probe, state_dir: Path, idempotency: bool) -> None:
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
    # "defaults": no concurrency or prefetch given, as a new user would run it.
    window = (
        {}
        if spec.get("defaults")
        else {"concurrency": int(spec["concurrency"]), "prefetch": int(spec["prefetch"])}
    )
    app.add_consumer(handler, spec["queue"], decode="json" if kind == "json" else None, **window)
    settings = Settings(
        urls=(spec["url"],),
        connect_timeout=5.0,
        grace_period=5.0,
        name="steadyrabbit-bench",
        state_dir=state_dir,
        idempotency=idempotency,
    )
    async with Worker(app, settings) as worker:
        await all_handled.wait()
        # stats.acked is a plain counter: poll it (only once the last handler ended).
        while worker.stats.acked < probe.messages:  # noqa: ASYNC110
            await asyncio.sleep(_ACK_POLL_S)
        await asyncio.sleep(0)  # an ack counted in this loop turn may be sent at its end
        probe.finish()
