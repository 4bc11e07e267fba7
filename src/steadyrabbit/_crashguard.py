"""Crash-loop protection for one worker: the crash log off the event loop, and the solo gate.

A crash is a start of a message that never finished: the process died, or the handler took
its connection down (an async handler that blocked the event loop past the heartbeat). To blame
only the message that did it, a redelivered message that already has an unfinished start runs
*solo*: it waits until every other handler of the worker has finished, and nothing else starts
until it is done. Whatever kills the process then is that message, and an innocent neighbour's
record never grows.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ._crashlog import CrashLog
from ._errors import ConfigurationError

log = logging.getLogger("steadyrabbit")

T = TypeVar("T")


class _Slots(Protocol):
    @property
    def in_flight(self) -> int: ...

    def resume(self) -> None: ...


class CrashGuard:
    """The worker's crash log and solo gate, shared by its consumers.

    ``closed`` is a plain attribute, read once per delivery: True while a solo run waits or
    runs, when no other message may start.
    """

    def __init__(self, state_dir: Path) -> None:
        self._log = CrashLog(state_dir)
        # One thread: the records of one worker are read and written in order.
        self._executor: ThreadPoolExecutor | None = None
        self._consumers: list[_Slots] = []
        self._queue: deque[asyncio.Future[None]] = deque()
        self._solo = False
        self._failures = 0
        self.closed = False

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

    def watch(self, consumer: _Slots) -> None:
        self._consumers.append(consumer)

    # -- the crash log: an error is logged and the message handled as if it had no record ------

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

    # -- the solo gate ---------------------------------------------------------------------

    async def solo(self, patience: float, withdrawn: asyncio.Event) -> bool:
        """Wait until the caller (which holds a handler slot) is the only message running.

        False if ``patience`` seconds passed first or ``withdrawn`` was set (shutdown): the
        caller then returns its message unstarted. Call :meth:`release` after a True.
        """
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(granted)
        self.closed = True
        self._grant()
        withdrawing = asyncio.ensure_future(withdrawn.wait())
        racers: set[asyncio.Future[Any]] = {granted, withdrawing}
        try:
            await asyncio.wait(racers, timeout=patience, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            if granted.done() and not granted.cancelled():
                self.release()  # granted, but the caller will never run: pass it on
            raise
        finally:
            withdrawing.cancel()
            if not granted.done():
                self._queue.remove(granted)
                granted.cancel()
                self._reopen_if_idle()
        if granted.cancelled():
            return False
        if withdrawn.is_set():
            self.release()
            return False
        return True

    def release(self) -> None:
        """The solo run is over: hand the gate to the next one waiting, or open it."""
        self._solo = False
        self._grant()
        self._reopen_if_idle()

    def finished(self) -> None:
        """A message finished while the gate was closed: a waiting solo run may start now."""
        self._grant()

    def _grant(self) -> None:
        if self._solo or not self._queue:
            return
        # Everyone waiting holds a slot too; the holder of the gate is counted in its own.
        others = sum(c.in_flight for c in self._consumers) - len(self._queue)
        if others == 0:
            self._solo = True
            self._queue.popleft().set_result(None)

    def _reopen_if_idle(self) -> None:
        if not self._solo and not self._queue and self.closed:
            self.closed = False
            for consumer in self._consumers:
                consumer.resume()
