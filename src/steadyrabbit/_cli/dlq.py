"""``steadyrabbit dlq``: look into, replay and purge ``<queue>.dlq``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import click

from .._config import Config
from .._errors import ClosedByUserError, ConfigurationError
from .._ops.dlq import (
    ReplayResult,
    format_dead_letter,
    format_dead_letters,
    list_dead_letters,
    purge_dead_letters,
    replay_dead_letters,
    show_dead_letter,
)
from .._settings import Settings
from .._topology import dead_letter_queue_name
from .exits import EXIT_FAILURE, EXIT_SIGNALLED
from .options import BROKER, configured

__all__ = ["dlq_group"]


@click.group("dlq")
def dlq_group() -> None:
    """Inspect, replay or purge the dead-letter queue QUEUE.dlq of a queue."""


@dlq_group.command("list")
@click.argument("queue")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="Show at most this many messages (from the head of the queue).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@configured(BROKER)
def dlq_list_command(
    queue: str,
    limit: int,
    as_json: bool,
    config: Config,
) -> None:
    """Show how many messages QUEUE.dlq holds and the first of them, leaving them in place.

    QUEUE is the original queue's name. One line per message, numbered from the head of the
    queue (see `dlq show QUEUE N`): the error (for the relay, the status and response body),
    the exception type, when it last failed, after how many attempts, and the start of the
    body. Lines fit the terminal, the error taking the room left; piped, nothing is cut
    (set COLUMNS to cut).
    """
    settings = config.settings()
    report = asyncio.run(list_dead_letters(settings, queue, limit=limit))
    if as_json:
        document = {
            "queue": report.queue,
            "dead_letter_queue": report.dead_letter_queue,
            "count": report.count,
            "entries": [asdict(entry) for entry in report.entries],
        }
        click.echo(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        click.echo(format_dead_letters(report, _table_width()))


def _table_width() -> int | None:
    """The terminal's width, or COLUMNS; None (nothing cut) when piped, for grep and files."""
    if sys.stdout.isatty() or "COLUMNS" in os.environ:
        return shutil.get_terminal_size().columns
    return None


@dlq_group.command("show")
@click.argument("queue")
@click.argument("position", metavar="N", type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print the message as JSON.")
@configured(BROKER)
def dlq_show_command(
    queue: str,
    position: int,
    as_json: bool,
    config: Config,
) -> None:
    """Show message N of QUEUE.dlq whole, leaving the queue as it was.

    N counts from 1 at the head of the queue, as `dlq list` numbers them. Prints every
    steadyrabbit header (the full reason, exception, attempts, times, the original queue,
    exchange and routing key), the properties, the other headers, and the body: as text when
    it is UTF-8 (control characters escaped), else as a hex dump. With --json, the body is
    "body" (text, or null) and "body_base64" (the exact bytes).
    """
    settings = config.settings()
    message = asyncio.run(show_dead_letter(settings, queue, position))
    if as_json:
        click.echo(json.dumps(message.to_json(), indent=2, ensure_ascii=False))
    else:
        click.echo(format_dead_letter(message))


def _confirmed(
    yes: bool, action: str, settings: Settings, queue: str, question: Callable[[int], str]
) -> bool:
    """Whether to go ahead. Without --yes, ask on a terminal, and refuse when nobody can answer.

    False when the dead-letter queue turned out empty (nothing to ask about); no is click.Abort.
    """
    if yes:
        return True
    dlq = dead_letter_queue_name(queue)
    if not sys.stdin.isatty():
        raise ConfigurationError(f"refusing to {action} {dlq} without --yes")
    count = asyncio.run(list_dead_letters(settings, queue, limit=0)).count
    if count == 0:
        click.echo(f"{dlq} is empty")
        return False
    click.confirm(question(count), default=False, abort=True)
    return True


@dlq_group.command("replay")
@click.argument("queue")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="Replay at most this many messages.  [default: all]",
)
@click.option(
    "--error",
    "error_filter",
    metavar="TEXT",
    help="Replay only messages whose error (reason or exception type) contains TEXT, "
    "case-insensitive; the others stay in place.",
)
@click.option(
    "--id",
    "message_id",
    metavar="MESSAGE_ID",
    help="Replay only the message(s) with this message id; the others stay in place. "
    "Exit status 1 if there is none.",
)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@configured(BROKER)
def dlq_replay_command(
    queue: str,
    limit: int | None,
    error_filter: str | None,
    message_id: str | None,
    yes: bool,
    config: Config,
) -> None:
    """Move the messages of QUEUE.dlq back to the queue they failed in, to be consumed again.

    Each one is published (persistent, with its properties and headers and the record of its
    original exchange and routing key, without steadyrabbit's failure headers, so its attempts
    start again) and removed from QUEUE.dlq only once the broker confirmed it. Only the
    messages present at the start are replayed. The first SIGINT or SIGTERM stops after the
    message in hand, and the exit status is then 130 (SIGINT) or 143 (SIGTERM); run the
    command again to replay the rest. A second signal aborts at once (exit status 1).
    """
    settings = config.settings()
    dlq = dead_letter_queue_name(queue)

    def question(count: int) -> str:
        if message_id is not None:
            return f"Replay the messages with id {message_id!r} of {dlq} to their queues?"
        some = f"up to {limit} of the" if limit is not None and limit < count else "the"
        return f"Replay {some} {count} messages of {dlq} to their queues?"

    if not _confirmed(yes, "replay", settings, queue, question):
        return
    with _ReplayProgress(f"replaying {dlq}") as progress:
        result, signals = asyncio.run(
            _replay(settings, queue, limit, error_filter, message_id, progress)
        )
    click.echo(_replay_summary(result, error_filter, message_id))
    if signals:
        # Interrupted: a script (or a shell loop) must not take this for a complete replay.
        sys.exit(EXIT_SIGNALLED + signals[0])
    if message_id is not None and result.replayed == 0:
        sys.exit(EXIT_FAILURE)


class _ReplayProgress:
    """A click progress bar on stderr, created once the total is known."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._stack = contextlib.ExitStack()
        self._bar: Any = None
        self._done = 0

    def __enter__(self) -> _ReplayProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = self._stack.enter_context(
                click.progressbar(length=total, label=self._label, file=sys.stderr, show_pos=True)
            )
        if done > self._done:
            self._bar.update(done - self._done)
            self._done = done


async def _replay(
    settings: Settings,
    queue: str,
    limit: int | None,
    error_filter: str | None,
    message_id: str | None,
    progress: Callable[[int, int], None],
) -> tuple[ReplayResult, list[int]]:
    """Run the replay; the first SIGINT/SIGTERM sets its stop event, a second one aborts it.

    Returns the result and the signals received while it ran.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    stop = asyncio.Event()
    signals: list[int] = []

    def on_signal(signum: int) -> None:
        signals.append(signum)
        if len(signals) == 1:
            stop.set()
            newline = "\n" if sys.stderr.isatty() else ""
            click.echo(
                f"{newline}stopping after the message in hand (signal again to abort)", err=True
            )
        elif task is not None:
            task.cancel()

    installed: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # no loop signal handlers on Windows
            loop.add_signal_handler(signum, on_signal, signum)
            installed.append(signum)
    try:
        result = await replay_dead_letters(
            settings,
            queue,
            limit=limit,
            error_filter=error_filter,
            message_id=message_id,
            progress=progress,
            stop=stop,
        )
    except asyncio.CancelledError:
        if len(signals) > 1:
            raise ClosedByUserError(
                f"replay aborted by a second signal; the message in flight, if any, may now be "
                f"both in its queue and in {dead_letter_queue_name(queue)}"
            ) from None
        raise
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
    return result, signals


def _replay_summary(
    result: ReplayResult, error_filter: str | None, message_id: str | None
) -> str:
    dlq = result.dead_letter_queue
    text = f"replayed {result.replayed} of {result.total} messages from {dlq}"
    unwanted = []
    if message_id is not None:
        unwanted.append(f"message id is not {message_id!r}")
    if error_filter is not None:
        unwanted.append(f"error does not contain {error_filter!r}")
    if unwanted:
        text += f" ({result.skipped} skipped: {' or '.join(unwanted)})"
    text += f"; {result.remaining} remain in {dlq}"
    if result.stopped:
        text = f"stopped by a signal: {text}"
    return text


@dlq_group.command("purge")
@click.argument("queue")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@configured(BROKER)
def dlq_purge_command(
    queue: str,
    yes: bool,
    config: Config,
) -> None:
    """Delete every message of QUEUE.dlq. Asks first, unless --yes."""
    settings = config.settings()
    dlq = dead_letter_queue_name(queue)

    def question(count: int) -> str:
        return f"Delete the {count} messages of {dlq}? This cannot be undone."

    if not _confirmed(yes, "purge", settings, queue, question):
        return
    purged = asyncio.run(purge_dead_letters(settings, queue))
    click.echo(f"purged {purged} {'message' if purged == 1 else 'messages'} from {dlq}")

