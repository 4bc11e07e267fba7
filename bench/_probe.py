"""What every benchmark child measures, whatever the framework: one ``Probe`` per run.

A consumer calls :meth:`Probe.start` when a handler begins (only the first call counts),
:meth:`Probe.handled` when a handler is done, and :meth:`Probe.acked` when an ack went out (or
:meth:`Probe.finish` once it knows the last ack went out). The throughput is
``messages / (last ack - first handler start)``.

This module must stay light: it is imported by every child before its framework, so its own
imports count in every framework's RSS alike.
"""

from __future__ import annotations

import resource
import threading
import time
from typing import Any


def rss_mb() -> float:
    """Current resident set size of this process, in MiB (VmRSS)."""
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (VmHWM, else ru_maxrss)."""
    kb = _status_kb("VmHWM")
    if not kb:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def _status_kb(field: str) -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Probe:
    """Counts and timestamps; thread-safe (sync handlers and dramatiq call it from threads)."""

    def __init__(self, messages: int, rss_marks: tuple[float, ...] = ()) -> None:
        self.messages = messages
        self.handled_count = 0
        self.acked_count = 0
        self.first_start: float | None = None
        self.last_ack: float | None = None
        # CPU time of the whole process (every thread), over the same span as the rate.
        self.first_cpu: float | None = None
        self.last_cpu: float | None = None
        self.rss: dict[str, float] = {}
        self._marks = {max(1, int(messages * share)): f"{share:.0%}" for share in rss_marks}
        self._lock = threading.Lock()

    def start(self) -> None:
        if self.first_start is None:
            now = time.perf_counter()
            with self._lock:
                if self.first_start is None:
                    self.first_start = now
                    self.first_cpu = time.process_time()

    def handled(self) -> bool:
        """Count one handled message; True when it was the last one."""
        with self._lock:
            self.handled_count += 1
            count = self.handled_count
        if count in self._marks:
            self.rss[self._marks[count]] = rss_mb()
        return count == self.messages

    def acked(self) -> bool:
        """Count one ack sent; True when it was the last one (the end time is taken then)."""
        with self._lock:
            self.acked_count += 1
            last = self.acked_count == self.messages
        if last:
            self.finish()
        return last

    def finish(self) -> None:
        """The last ack went out: stop the clock."""
        if self.last_ack is None:
            self.last_ack = time.perf_counter()
            self.last_cpu = time.process_time()
            self.rss["100%"] = rss_mb()

    def result(self) -> dict[str, Any]:
        if self.first_start is None or self.last_ack is None:
            raise RuntimeError("the run did not finish")
        elapsed = self.last_ack - self.first_start
        return {
            "messages": self.messages,
            "handled": self.handled_count,
            "elapsed_s": elapsed,
            "msg_per_s": self.messages / elapsed if elapsed > 0 else None,
            "cpu_s_per_10k": (
                None
                if self.first_cpu is None or self.last_cpu is None
                else (self.last_cpu - self.first_cpu) / self.messages * 10_000
            ),
            "rss_mb": dict(self.rss),
            # VmHWM and VmRSS are updated lazily and can disagree by a few pages: take the max.
            "peak_rss_mb": max([peak_rss_mb(), *self.rss.values()]),
        }
