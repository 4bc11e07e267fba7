"""``steadyrabbit demo``: the quick start.

The run is :func:`steadyrabbit._ops.demo.run.run_demo`; this module adds what only a terminal
needs: the publishing progress bar on stderr, the summary on stdout and the exit status.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable
from typing import TextIO

import click

from .._config import Config
from .._errors import ClosedByUserError
from .._ops.demo.result import format_summary
from .._ops.demo.run import run_demo
from .._settings import Settings
from .exits import EXIT_FAILURE, EXIT_OK
from .options import BROKER, configured

__all__ = ["demo_cmd", "demo_command"]


@click.command("demo")
@click.option(
    "--messages",
    type=int,
    default=60,
    show_default=True,
    help="Messages in the backlog, 1 to 1000000 (from 5 on, two of them poison).",
)
@click.option(
    "--concurrency",
    type=int,
    default=2,
    show_default=True,
    help="Requests the relay keeps in flight, 1 to 1000.",
)
@click.option(
    "--live/--no-live",
    default=True,
    show_default=True,
    help="Show the worker's live view (on a terminal; piped: a status line every 5 s).",
)
@click.option(
    "--keep", is_flag=True, help="Leave the demo's queues on the broker (see `dlq list`)."
)
@click.option(
    "--seed", type=int, default=42, show_default=True, help="Seed of the service's answers."
)
@configured(BROKER)
def demo_cmd(
    messages: int, concurrency: int, live: bool, keep: bool, seed: int, config: Config
) -> None:
    """Relay a backlog to a slow, flaky local web service, reset the connection part-way, and
    account for every message.

    Against the broker of --url (the local one by default): publishes a backlog to the
    steadyrabbit-demo exchange, relays it with retries and a dead-letter queue while showing
    the live view, cuts the worker's connection a third of the way through, and ends with a
    summary: delivered, retried, dead-lettered, reconnects survived, lost. Exit status 0 when
    every message is accounted for. Its own queues (steadyrabbit-demo.*) are deleted before
    and after the run.
    """
    sys.exit(
        demo_command(
            config.settings(),
            messages=messages,
            concurrency=concurrency,
            live=live,
            keep=keep,
            seed=seed,
        )
    )


class _ProgressBar:
    """:func:`run_demo`'s progress callback, drawn with click's progress bar: opened at the
    first report, finished at the last one (or by :meth:`close`)."""

    def __init__(self, file: TextIO, label: str = "publishing") -> None:
        self._file = file
        self._label = label
        self._open: contextlib.ExitStack | None = None
        self._update: Callable[[int], None] = lambda _steps: None
        self._done = 0

    def __call__(self, done: int, total: int) -> None:
        if self._open is None:
            self._open = contextlib.ExitStack()
            bar = self._open.enter_context(
                click.progressbar(length=total, label=self._label, file=self._file, show_pos=True)
            )
            self._update = bar.update
        self._update(done - self._done)
        self._done = done
        if done >= total:
            self.close()

    def close(self) -> None:
        """Finish the bar, if one is drawn."""
        stack, self._open = self._open, None
        if stack is not None:
            stack.close()


def demo_command(
    settings: Settings,
    *,
    messages: int = 60,
    concurrency: int = 2,
    live: bool = True,
    keep: bool = False,
    seed: int = 42,
    out: TextIO | None = None,
    progress: TextIO | None = None,
) -> int:
    """``steadyrabbit demo``: run :func:`run_demo` on stdout (the progress bar on stderr),
    print the summary, and return the exit status: 0 only when every message is accounted for.

    Ctrl-C stops at once with :class:`ClosedByUserError` (one line from the CLI): the worker is
    aborted and the broker keeps the demo's queues until the next run deletes them.
    """
    stream = sys.stdout if out is None else out
    bar = _ProgressBar(sys.stderr if progress is None else progress)
    try:
        result = asyncio.run(
            run_demo(
                settings,
                out=stream,
                messages=messages,
                concurrency=concurrency,
                live=live,
                keep=keep,
                seed=seed,
                progress=bar,
            )
        )
    except KeyboardInterrupt:
        stream.write("\n")
        raise ClosedByUserError(
            "demo interrupted; its queues stay on the broker until the next run deletes them"
        ) from None
    finally:
        bar.close()
    stream.write("\n" + format_summary(result))
    stream.flush()
    return EXIT_OK if result.ok else EXIT_FAILURE
