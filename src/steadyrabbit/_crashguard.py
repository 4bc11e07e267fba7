"""Crash-loop counting, as the built-in middleware :class:`CrashLoopCounter`.

A crash is a start of a message that never finished: the process died, or the handler took its
connection down (an async handler that blocked the event loop past the heartbeat). The broker
redelivers such a message, flagged ``redelivered``, and only redeliveries are counted, through
the ``around_redelivery`` hook, so a first delivery costs nothing here.

For each redelivery, in order:

1. the unfinished starts recorded for it are read from the crash log (:mod:`._crashlog`, off
   the event loop in one thread, so the worker's records are written in order);
2. if there are any, it runs solo (:mod:`._gate`): whatever kills the process then is that
   message, and an innocent neighbour's record never grows;
3. at the consumer's ``max_deliveries`` starts it is dead-lettered as a crash loop, without
   running, and its record is deleted once the dead letter is confirmed and the original acked;
4. otherwise a start is recorded, the handler runs, and the record is deleted once the handler
   finished, whatever became of its ack. A run that killed its connection keeps it.

An error of the crash log is logged in one line and the message handled as if it had no record.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from ._crashlog import CrashLog
from ._decision import CrashLoop
from ._errors import ConfigurationError
from ._gate import SoloGate
from ._message import Message, fingerprint
from ._middleware import Middleware, RedeliveryNext

log = logging.getLogger("steadyrabbit")

T = TypeVar("T")


class CrashRecords:
    """The worker's crash log, used from the event loop: one thread does its I/O."""

    def __init__(self, state_dir: Path) -> None:
        self._log = CrashLog(state_dir)
        self._executor: ThreadPoolExecutor | None = None
        self._failures = 0

    @property
    def path(self) -> Path:
        return self._log.path

    def check(self) -> None:
        """Raise :class:`ConfigurationError` if the state directory cannot hold the log."""
        try:
            self._log.check()
        except (OSError, sqlite3.Error) as exc:
            self._log.close()
            raise ConfigurationError(
                f"the state directory {self._log.path.parent} is not usable ({exc}): "
                "crash-loop records of redelivered messages are kept there; set --state-dir "
                "or STEADYRABBIT_STATE_DIR to a writable directory"
            ) from None

    def open(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="steadyrabbit-crashlog")

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._log.close()

    async def unfinished(self, key: str) -> int | None:
        """Unfinished starts recorded for ``key``; None if the log failed (logged)."""
        return await self._call(self._log.unfinished, key)

    async def record_start(self, key: str) -> None:
        await self._call(self._log.record_start, key)

    async def forget(self, key: str) -> None:
        await self._call(self._log.forget, key)

    async def _call(self, operation: Callable[[str], T], key: str) -> T | None:
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._executor, operation, key)
        except (OSError, sqlite3.Error) as exc:
            self._failures += 1
            log.error(  # noqa: TRY400 - one line; the traceback says nothing more
                "the crash-loop log %s failed (%s: %s); handling the message without it "
                "(%d failure(s) so far)",
                self._log.path,
                type(exc).__name__,
                exc,
                self._failures,
            )
            return None
        self._failures = 0
        return result


class CrashLoopCounter(Middleware):
    """Dead-letters a message that keeps killing its worker (see the module documentation).

    One per consumer (its ``max_deliveries`` and patience); the records and the gate are the
    worker's. ``patience``: how long a redelivery may wait for its solo run before it goes back
    to the queue unstarted, well within the broker's ``consumer_timeout``.
    """

    def __init__(
        self,
        records: CrashRecords,
        gate: SoloGate,
        *,
        max_starts: int,
        patience: float,
        vhost: str,
    ) -> None:
        self._records = records
        self._gate = gate
        self._max_starts = max_starts
        self._patience = patience
        self._vhost = vhost

    async def around_redelivery(self, message: Message, call_next: RedeliveryNext) -> bool:
        records = self._records
        key = fingerprint(message, self._vhost)
        unfinished = await records.unfinished(key)
        if unfinished is None:  # the log failed (logged): handle it as a first delivery
            return await call_next(message)
        solo = bool(unfinished)
        if solo:
            await self._gate.solo(self._patience)  # NotAdmitted: back to the queue, no blame
        try:
            if solo:  # while it waited, other deliveries of it may have finished or crashed
                unfinished = await records.unfinished(key)
            starts = (unfinished or 0) + 1  # the first delivery was never recorded
            if starts >= self._max_starts:
                if await call_next(message, end_with=CrashLoop(starts)):
                    await records.forget(key)
                return False
            await records.record_start(key)
            finished = await call_next(message)
            if finished:
                await records.forget(key)
            return finished
        finally:
            if solo:
                self._gate.release()
