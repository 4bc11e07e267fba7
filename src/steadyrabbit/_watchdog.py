"""Loop-lag watchdog: names the code that blocks the event loop (and so stalls heartbeats)."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Callable, Collection, Mapping
from time import monotonic
from types import CodeType, FrameType

from ._stats import Stats

log = logging.getLogger("steadyrabbit")


class LoopLagWatchdog:
    """A thread that notices when the event loop stops turning and reports what it is running.

    The loop stamps a timestamp every ``threshold / 4``; when the stamp is older than
    ``threshold`` the thread reads the loop thread's current stack, so the warning names the
    blocking handler (or the innermost frame) while it is still blocking.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        threshold: float,
        handlers: Mapping[CodeType, str],
        stats: Stats,
        on_stall: Callable[[str, float], None] | None = None,
        message_frames: Collection[CodeType] = (),
    ) -> None:
        """``on_stall(culprit, seconds)`` is called on the loop, once it turns again, for each
        stall (the alerter's hook). ``message_frames``: code of the functions that run a
        handler with a local ``message``; the message a stall happens under is marked."""
        self._loop = loop
        self._threshold = threshold
        self._interval = threshold / 4
        self._handlers = dict(handlers)
        self._stats = stats
        self._on_stall = on_stall
        self._message_frames = frozenset(message_frames)
        self._last_turn = monotonic()
        self._loop_thread = threading.get_ident()
        self._stop = threading.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._thread = threading.Thread(
            target=self._watch, name="steadyrabbit-watchdog", daemon=True
        )
        self.lag = 0.0  # the latest measurement, seconds (about 0 while the loop turns)
        self.max_lag = 0.0

    def start(self) -> None:
        self._turn()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.cancel()
        self._thread.join()

    def _turn(self) -> None:
        self._last_turn = monotonic()
        self._timer = self._loop.call_later(self._interval, self._turn)

    def _watch(self) -> None:
        reported = False
        while not self._stop.wait(self._interval):
            lag = monotonic() - self._last_turn - self._interval
            self.lag = max(0.0, lag)
            self.max_lag = max(self.max_lag, lag)
            if lag < self._threshold:
                reported = False
                continue
            frame = sys._current_frames().get(self._loop_thread)
            self._mark_message(frame, lag)
            if reported:
                continue
            reported = True
            self._stats.loop_stalls += 1
            culprit = self._describe(frame)
            log.warning(
                "the event loop has been blocked for %.1f s by %s: heartbeats and acks are "
                "stalled; use a sync handler (it runs in a thread) or await instead of blocking",
                lag,
                culprit,
            )
            if self._on_stall is not None:
                self._loop.call_soon_threadsafe(self._on_stall, culprit, lag)

    def _mark_message(self, frame: FrameType | None, lag: float) -> None:
        """Tell the message whose handler is blocking the loop (``message.blocked_loop``), so
        that the consumer can count the run as a crash if the connection dies of it."""
        while frame is not None:
            if frame.f_code in self._message_frames:
                message = frame.f_locals.get("message")
                if message is not None and getattr(message, "blocked_loop", None) is not None:
                    message.blocked_loop = max(message.blocked_loop, lag)
                return
            frame = frame.f_back

    def _describe(self, frame: FrameType | None) -> str:
        innermost = frame
        while frame is not None:
            name = self._handlers.get(frame.f_code)
            if name is not None:
                return f"handler {name} (line {frame.f_lineno})"
            frame = frame.f_back
        if innermost is None:
            return "unknown code"
        code = innermost.f_code
        return f"{code.co_qualname} ({code.co_filename}:{innermost.f_lineno})"
