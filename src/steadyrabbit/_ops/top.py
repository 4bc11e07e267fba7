"""``steadyrabbit top``: a live terminal view of a running worker, read from its metrics endpoint.

The worker serves its status as JSON (``/status.json``, see :mod:`steadyrabbit._status`); this
module fetches it (:func:`fetch_status`), turns two successive documents into a screen of text
(:func:`render`, a pure function: rates come from counter deltas) and redraws it every
``interval`` seconds (:func:`watch`). On a terminal each frame replaces the previous one;
piped, frames are appended, separated by a blank line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import httpx

from .._errors import ConfigurationError, StatusUnavailableError
from .._url import mask_url

__all__ = ["fetch_status", "render", "run_top", "status_url", "watch"]

DEFAULT_TIMEOUT = 5.0
#: Columns of a frame that does not go to a terminal.
PIPE_WIDTH = 100
#: In-flight handlers listed per queue, oldest first (the document holds at most 20).
MAX_AGE_LINES = 8
_KNOWN_PATHS = ("/status.json", "/metrics", "/healthz", "/readyz", "/status")
_CLEAR = "\x1b[H\x1b[2J"
_BOLD, _GREEN, _YELLOW, _RED, _RESET = "\x1b[1m", "\x1b[32m", "\x1b[33m", "\x1b[31m", "\x1b[0m"
_ERRNO = re.compile(r"^\[Errno -?\d+\]\s*")
#: Columns of a queue's row besides its name, with the DUP column.
_ROW_WITH_DUP = 62


# -- fetching ------------------------------------------------------------------------------------


def status_url(url: str) -> str:
    """The ``/status.json`` URL of a worker's metrics endpoint given as ``http://host:port``,
    ``host:port`` or a bare port (on 127.0.0.1), with or without a path: a known path
    (``/metrics``, ``/status.json``, ...) is replaced, any other is kept as a prefix (a worker
    behind a reverse proxy)."""
    text = url.strip()
    if text.isdigit():
        text = f"127.0.0.1:{text}"
    if "://" not in text:
        text = f"http://{text}"
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        raise ConfigurationError(f"malformed metrics URL {mask_url(url)!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(
            f"malformed metrics URL {mask_url(url)!r}: expected http://HOST:PORT, the address "
            "the worker's --metrics-port serves"
        )
    path = parts.path.rstrip("/")
    for known in _KNOWN_PATHS:
        if path.endswith(known):
            path = path[: -len(known)]
            break
    return urlunsplit((parts.scheme, parts.netloc, f"{path}/status.json", "", ""))


async def fetch_status(url: str, *, client: httpx.AsyncClient | None = None) -> dict[str, Any]:
    """The status document of the worker whose metrics endpoint is ``url``, within
    ``DEFAULT_TIMEOUT`` seconds, without blocking the event loop (which may be the worker's
    own); ``client`` is reused if given.

    Raises :class:`StatusUnavailableError` (one sentence) when nothing answers there, or not
    as a steadyrabbit worker.
    """
    endpoint = status_url(url)
    try:
        if client is None:
            async with httpx.AsyncClient() as own:
                response = await own.get(endpoint, timeout=DEFAULT_TIMEOUT)
        else:
            response = await client.get(endpoint, timeout=DEFAULT_TIMEOUT)
    except httpx.HTTPError as exc:
        raise _unreachable(endpoint, exc) from None
    return _document(endpoint, response)


def _unreachable(endpoint: str, exc: httpx.HTTPError) -> StatusUnavailableError:
    if isinstance(exc, httpx.TimeoutException):
        reason = f"no answer within {DEFAULT_TIMEOUT:g} s"
    else:
        reason = _ERRNO.sub("", str(exc)) or type(exc).__name__
        # The async transport says "All connection attempts failed" and keeps the reason (say,
        # refused) further down the chain: name that, as the sync one does.
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, OSError) and cause.errno:
                reason = os.strerror(cause.errno)
            cause = cause.__cause__ or cause.__context__
    return StatusUnavailableError(
        f"cannot read {mask_url(endpoint)}: {reason} (is a steadyrabbit worker running there "
        "with --metrics-port?)"
    )


def _document(endpoint: str, response: httpx.Response) -> dict[str, Any]:
    shown = mask_url(endpoint)
    if response.status_code != 200:
        raise StatusUnavailableError(
            f"{shown} answered HTTP {response.status_code}: not a steadyrabbit worker's metrics "
            "endpoint (or a version without /status.json)"
        )
    try:
        document = response.json()
    except ValueError:
        document = None
    if not isinstance(document, dict) or document.get("kind") != "steadyrabbit.status":
        raise StatusUnavailableError(
            f"{shown} did not answer with a steadyrabbit worker's status: not a steadyrabbit "
            "metrics endpoint"
        )
    return document


# -- rendering -----------------------------------------------------------------------------------


def render(
    previous: Mapping[str, Any] | None,
    current: Mapping[str, Any],
    elapsed: float,
    width: int,
    *,
    color: bool = False,
) -> str:
    """One screen of text for the status document ``current``; no line is wider than ``width``.

    Rates are counter deltas from ``previous`` (the document fetched ``elapsed`` seconds
    earlier) per second; without it, or after the worker restarted, they are averages since
    the worker started. ``color`` adds ANSI colours (for a terminal).
    """
    width = max(20, width)
    if previous is not None and not _same_run(previous, current):
        previous = None
    if previous is None or elapsed <= 0:
        previous, elapsed = None, float(_get(current, "worker", "uptime_seconds") or 0.0)
        rate_note = "avg since start"
    else:
        rate_note = f"last {elapsed:.1f}s"
    paint = _painter(color)
    worker = current.get("worker", {})
    timeout = float(current.get("consumer_timeout_seconds") or 0.0)
    lines: list[str] = []

    ready = current.get("ready")
    state = (
        paint("READY", _GREEN)
        if ready
        else paint(f"NOT READY: {current.get('not_ready_reason') or '?'}", _RED)
    )
    lines.append(
        _fit(
            f"{worker.get('name', '?')}  pid {worker.get('pid', '?')} on {worker.get('host', '?')}"
            f"  up {_duration(worker.get('uptime_seconds'))}  ",
            width,
        )
        + state
    )
    heartbeat = current.get("heartbeat_seconds")
    # Fields are packed into lines of ``width``: a field that does not fit starts the next
    # line, so a narrow terminal wraps them instead of cutting the last ones off.
    lines += _pack(
        [
            f"consumer_timeout {_duration(timeout)}",
            f"heartbeat {'-' if heartbeat is None else f'{heartbeat}s'}",
            f"loop lag {_millis(current.get('loop_lag_seconds'))}"
            f" (max {_millis(current.get('loop_lag_max_seconds'))})",
            f"broker traffic {_duration(current.get('broker_traffic_age_seconds'))} ago",
        ],
        width,
    )
    lines.append(f"broker {current.get('broker', '?')}")
    lines.append("")

    totals = current.get("totals", {})
    before = None if previous is None else previous.get("totals", {})

    def rate(key: str) -> str:
        return _rate(totals.get(key), None if before is None else before.get(key), elapsed)

    indent = " " * len("throughput  ")
    lines += _pack(
        [
            paint(f"throughput  {rate('succeeded')} msg/s succeeded", _BOLD) + f" ({rate_note})",
            f"delivered {rate('delivered')}/s",
            f"retried {rate('retried')}/s",
            f"dead-lettered {rate('dead_lettered')}/s",
        ],
        width,
        indent,
    )
    lines += _pack(
        [
            f"totals      delivered {totals.get('delivered', 0)}",
            f"succeeded {totals.get('succeeded', 0)}",
            f"retried {totals.get('retried', 0)}",
            f"dead-lettered {totals.get('dead_lettered', 0)}",
            f"errors {totals.get('handler_errors', 0)}",
            f"stale acks {totals.get('stale_acks_dropped', 0)}",
        ],
        width,
        indent,
    )
    reconnects: Mapping[str, int] = current.get("reconnects", {})
    causes = ", ".join(f"{cause} {n}" for cause, n in sorted(reconnects.items()) if n)
    total_reconnects = sum(reconnects.values())
    lines += _pack(
        [
            (paint if total_reconnects else _plain)(
                f"reconnects  {total_reconnects}" + (f" ({causes})" if causes else ""), _YELLOW
            ),
            f"channel recoveries {totals.get('channel_recoveries', 0)}",
            f"requeued: unstarted {totals.get('requeued_unstarted', 0)},"
            f" aged {totals.get('requeued_aged', 0)}",
        ],
        width,
        indent,
    )
    lines.append("")
    lines.extend(_queues(previous, current, elapsed, width, timeout, paint))
    return "\n".join(_fit(line, width) for line in lines) + "\n"


def _queues(
    previous: Mapping[str, Any] | None,
    current: Mapping[str, Any],
    elapsed: float,
    width: int,
    timeout: float,
    paint: _Paint,
) -> list[str]:
    consumers: list[Mapping[str, Any]] = current.get("consumers", [])
    if not consumers:
        return ["no consumers"]
    before = {c.get("queue"): c for c in (previous or {}).get("consumers", [])}
    name_width = max(5, min(max(len(str(c.get("queue", ""))) for c in consumers), width - 54))
    # DUP (duplicates suppressed) comes last, where there is room: a long name keeps its width.
    dup = name_width + _ROW_WITH_DUP <= width
    lines = [
        f"{'QUEUE':<{name_width}}  {'RUNNING':>9}  {'WAITING':>7}  {'WINDOW':>6}  {'HANDLED':>8}  "
        f"{'MSG/S':>7}  {'OLDEST':>6}" + (f"  {'DUP':>5}" if dup else "")
    ]
    bar_width = max(4, min(40, width - 34))
    for consumer in consumers:
        queue = str(consumer.get("queue", "?"))
        earlier = before.get(queue) if previous is not None else None
        handled = consumer.get("handled", 0)
        throughput = _rate(handled, None if earlier is None else earlier.get("handled"), elapsed)
        running = f"{consumer.get('in_flight', 0)}/{consumer.get('concurrency', '?')}"
        flag = "" if consumer.get("ready") else "  (not consuming)"
        duplicates = f"  {consumer.get('duplicates', 0):>5}" if dup else ""
        lines.append(
            f"{_clip(queue, name_width):<{name_width}}  {running:>9}  "
            f"{consumer.get('waiting', 0):>7}  {consumer.get('prefetch', '?'):>6}  "
            f"{handled:>8}  {throughput:>7}  "
            f"{_duration(consumer.get('oldest_unacked_age_seconds')):>6}{duplicates}{flag}"
        )
        ages: list[float] = consumer.get("in_flight_ages_seconds", [])
        for age in ages[:MAX_AGE_LINES]:
            share = age / timeout if timeout > 0 else 0.0
            filled = min(bar_width, round(share * bar_width))
            bar = "#" * filled + "." * (bar_width - filled)
            line = f"  {_duration(age):>7} [{bar}] {share:4.0%} of {_duration(timeout)}"
            if share >= 0.5:
                line += " !"
            colour = _RED if share >= 0.9 else _YELLOW if share >= 0.5 else ""
            lines.append(paint(_fit(line, width), colour) if colour else line)
        more = len(ages) - MAX_AGE_LINES + int(consumer.get("in_flight_ages_omitted", 0))
        if more > 0:
            lines.append(f"  ... {more} more running")
    return lines


def _pack(fields: list[str], width: int, indent: str = "") -> list[str]:
    """``fields`` two spaces apart, in lines of at most ``width`` visible columns: a field that
    does not fit goes to the next line, after ``indent``. (A field wider than a line on its own
    is left to the final cut.)"""
    lines: list[str] = []
    line = ""
    for field in fields:
        if not line:
            line = field
        elif _visible(line) + 2 + _visible(field) <= width:
            line += "  " + field
        else:
            lines.append(line)
            line = indent + field
    if line:
        lines.append(line)
    return lines


def _visible(text: str) -> int:
    """Columns ``text`` takes on a terminal (colour codes take none)."""
    return len(_ANSI.sub("", text))


def _same_run(previous: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """False when the worker behind the endpoint restarted in between (counters reset)."""
    return _get(previous, "worker", "pid") == _get(current, "worker", "pid") and float(
        _get(previous, "worker", "uptime_seconds") or 0.0
    ) <= float(_get(current, "worker", "uptime_seconds") or 0.0)


def _get(document: Mapping[str, Any], *keys: str) -> Any:
    value: Any = document
    for key in keys:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def _rate(now: Any, before: Any, elapsed: float) -> str:
    if not isinstance(now, int | float) or elapsed <= 0:
        return "-"
    base = before if isinstance(before, int | float) else 0
    return f"{max(0.0, (now - base) / elapsed):.1f}"


def _millis(value: Any) -> str:
    return "-" if not isinstance(value, int | float) else f"{value * 1000:.1f}ms"


def _duration(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    seconds = float(value)
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "~"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _fit(line: str, width: int) -> str:
    """``line`` cut to ``width`` visible columns (colour codes take none)."""
    if len(_ANSI.sub("", line)) <= width:
        return line
    plain = _ANSI.sub("", line)
    return _clip(plain, width)


_Paint = Callable[[str, str], str]


def _plain(text: str, _code: str) -> str:
    return text


def _coloured(text: str, code: str) -> str:
    return f"{code}{text}{_RESET}" if code else text


def _painter(enabled: bool) -> _Paint:
    return _coloured if enabled else _plain


# -- the live view -------------------------------------------------------------------------------


async def watch(
    url: str,
    *,
    interval: float = 1.0,
    out: TextIO,
    stop: asyncio.Event | None = None,
    iterations: int | None = None,
) -> None:
    """Show the worker at ``url`` on ``out`` every ``interval`` seconds.

    Runs until ``stop`` is set, ``iterations`` frames were shown, or it is cancelled. On a
    terminal (``out.isatty()``) each frame replaces the screen, in colour; otherwise frames
    are appended, separated by a blank line. Raises :class:`StatusUnavailableError` if the
    first fetch fails; later failures (a worker restarting) are shown and retried.
    """
    if not interval > 0:
        raise ConfigurationError("the interval must be > 0 seconds")
    endpoint = status_url(url)
    tty = out.isatty()
    redraw = tty and iterations != 1
    previous: dict[str, Any] | None = None
    frames = 0
    async with httpx.AsyncClient() as client:
        while stop is None or not stop.is_set():
            width = shutil.get_terminal_size((PIPE_WIDTH, 24)).columns if tty else PIPE_WIDTH
            try:
                current = await fetch_status(endpoint, client=client)
            except StatusUnavailableError as exc:
                if frames == 0:
                    raise
                frame = f"{exc} (trying again every {interval:g} s)\n"
                previous = None
            else:
                frame = render(previous, current, _elapsed(previous, current), width, color=tty)
                previous = current
            if redraw:
                out.write(_CLEAR + frame)
            else:
                out.write(frame if frames == 0 else "\n" + frame)
            out.flush()
            frames += 1
            if iterations is not None and frames >= iterations:
                return
            if stop is None:
                await asyncio.sleep(interval)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)


def _elapsed(previous: Mapping[str, Any] | None, current: Mapping[str, Any]) -> float:
    """Seconds between two documents by the worker's own clock (a slow answer does not skew
    the rates)."""
    if previous is None:
        return 0.0
    then = _get(previous, "worker", "uptime_seconds")
    now = _get(current, "worker", "uptime_seconds")
    if isinstance(then, int | float) and isinstance(now, int | float):
        return float(now - then)
    return 0.0


def run_top(
    url: str, *, interval: float = 1.0, once: bool = False, out: TextIO | None = None
) -> None:
    """``steadyrabbit top URL [--interval S] [--once]``: until Ctrl-C (or one frame)."""
    stream = sys.stdout if out is None else out
    try:
        asyncio.run(watch(url, interval=interval, out=stream, iterations=1 if once else None))
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a live view ends
    finally:
        if stream.isatty() and not once:
            stream.write("\n")
