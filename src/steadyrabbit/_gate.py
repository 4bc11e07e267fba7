"""The solo gate: scheduling that lets one message run with nothing beside it.

Crash-loop counting (see :mod:`._crashguard`) blames only the message that kills the process:
a redelivered message with an unfinished start runs *solo*. It waits until every other handler
of the worker has finished, and no other message starts until it is done. The gate is part of
the worker's scheduling, shared by its consumers: each reads :attr:`SoloGate.closed` once per
delivery and tells the gate when a message finished while it was closed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Protocol

#: How long a delivered message may wait unstarted in the client (for a free slot or for its
#: solo run), as a share of the broker's ``consumer_timeout``: its clock runs from delivery.
UNSTARTED_PATIENCE_SHARE = 0.5
#: A run still going at this share of ``consumer_timeout`` after its delivery is handed off
#: (see :mod:`._idempotency`); the rest leaves room for the keeper's tick and the marker.
HANDOFF_SHARE = 0.6


class NotAdmitted(Exception):
    """The solo run was not granted in time, or the worker is stopping: the message goes back
    to its queue unstarted (no record, no blame)."""


class _Slots(Protocol):
    @property
    def in_flight(self) -> int: ...

    def resume(self) -> None: ...


class SoloGate:
    """One worker's solo gate. ``closed`` is a plain attribute, read once per delivery: True
    while a solo run waits or runs, when no other message may start."""

    def __init__(self) -> None:
        self._consumers: list[_Slots] = []
        self._queue: deque[asyncio.Future[None]] = deque()
        self._solo = False
        self._withdrawn = asyncio.Event()
        self.closed = False

    def watch(self, consumer: _Slots) -> None:
        self._consumers.append(consumer)

    def withdraw(self) -> None:
        """The worker stops: nobody waiting is granted a solo run any more."""
        self._withdrawn.set()

    async def solo(self, patience: float) -> None:
        """Wait until the caller (which holds a handler slot) is the only message running.

        Raises :class:`NotAdmitted` if ``patience`` seconds passed first or the worker is
        stopping. Call :meth:`release` once the solo run is over.
        """
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(granted)
        self.closed = True
        self._grant()
        withdrawing = asyncio.ensure_future(self._withdrawn.wait())
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
            raise NotAdmitted
        if self._withdrawn.is_set():
            self.release()
            raise NotAdmitted

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
