"""The command line: a thin layer over :func:`steadyrabbit.run` and :func:`relay_app`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NoReturn, TypeVar

import annotated_types
import click

from ._app import App
from ._config import CONFIG_ENV, ENV_PREFIX, Config, env_name, flag, load_config
from ._demo import demo_command
from ._errors import ClosedByUserError, ConfigurationError, SteadyRabbitError
from ._ops.dlq import (
    ReplayResult,
    format_dead_letter,
    format_dead_letters,
    list_dead_letters,
    purge_dead_letters,
    replay_dead_letters,
    show_dead_letter,
)
from ._ops.doctor.gather import diagnose
from ._ops.doctor.render import can_encode, format_report
from ._ops.processes import run_worker_pool, watch_pool, without_option
from ._ops.relay import relay_app
from ._ops.top import run_top
from ._retry import RetryPolicy
from ._settings import Settings
from ._topology import dead_letter_queue_name
from ._url import MaskingFilter, MaskingFormatter, mask_url
from ._worker import run

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# With --processes, a worker that exits with status 1 within the connect timeout plus this long
# of its start never got up (bad credentials, no broker): every worker would fail the same way.
_STARTUP_MARGIN = 10.0


@dataclass(frozen=True)
class _Option:
    """A command-line flag for the :class:`Config` setting ``key`` (``--key-with-dashes``)."""

    key: str
    type: Any
    help: str
    metavar: str | None = None
    multiple: bool = False
    aliases: tuple[str, ...] = ()
    #: The range shown in --help, when the command's differs from Config's.
    limits: str | None = None

    def decorate(self, fn: F) -> F:
        default = Config.model_fields[self.key].default
        if self.key == "url":
            default = ", ".join(mask_url(url) for url in default)
        elif isinstance(default, tuple):
            default = ", ".join(map(str, default)) or None
        shown = "" if default is None else f"default: {default}; "
        limits = _limits(self.key) if self.limits is None else self.limits
        return click.option(
            self.key,
            flag(self.key),
            *self.aliases,
            type=self.type,
            multiple=self.multiple,
            default=() if self.multiple else None,
            metavar=self.metavar,
            help=f"{self.help}  [{shown}env {env_name(self.key)}{limits}]",
        )(fn)


def _limits(key: str) -> str:
    """The range of a numeric setting as click shows its own (``; 0<=x<=65535``), or ""."""
    low = high = ""
    for limit in Config.model_fields[key].metadata:
        if isinstance(limit, annotated_types.Ge):
            low = f"{limit.ge}<="
        elif isinstance(limit, annotated_types.Gt):
            low = f"{limit.gt}<"
        elif isinstance(limit, annotated_types.Le):
            high = f"<={limit.le}"
    if low and high:
        return f"; {low}x{high}"
    if low:  # x>=1 reads better than 1<=x
        bound, sign = low.rstrip("<="), ">=" if low.endswith("<=") else ">"
        return f"; x{sign}{bound}"
    return ""


# Flags are parsed as plain numbers: their limits are Config's, checked (and shown in --help)
# from there, so that a flag, a variable and a file key are held to the same ones.
_BROKER = (
    _Option(
        "url", str, "Broker URL; repeat (or separate with commas) for several nodes, tried in "
        "turn.", metavar="URL", multiple=True,
    ),
    _Option(
        "heartbeat", int, "AMQP heartbeat in seconds; a dead peer is "
        "noticed after about two. 0 turns it off (not recommended).",
    ),
    _Option(
        "connect_timeout", float, "At startup, give up when no broker answered within this "
        "many seconds; once connected, reconnection never gives up.",
    ),
    _Option(
        "log_level", click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
        "Log level.",
    ),
    _Option(
        "log_format", click.Choice(["plain", "json"]), "json: one JSON object per line (time, "
        "level, logger, pid, message, error).",
    ),
)
_WORKER = (
    _Option(
        "grace_period", float, "On SIGTERM/SIGINT, seconds running handlers "
        "get to finish.",
    ),
    _Option(
        "consumer_timeout", float, "The broker's consumer_timeout in seconds (RabbitMQ "
        "default 1800); prefetched messages that wait half of it unstarted go back to the queue.",
    ),
    _Option(
        "state_dir", click.Path(file_okay=False), "Where crash-loop records of classic-queue "
        "messages are kept.  (~/.local/state/steadyrabbit when unset)", metavar="DIR",
    ),
    _Option(
        "processes", int, "Run N worker processes, each with its own "
        "connection, under a supervisor that restarts one that dies and passes SIGTERM/SIGINT "
        "on (signal the supervisor only; systemd: KillMode=mixed).", metavar="N",
    ),
    _Option(
        "metrics_port", int, "Serve Prometheus /metrics, /healthz, "
        "/readyz, /status.json and a status page (/) over HTTP on this port (0: a free port, "
        "logged); with --processes N, worker i on PORT+i.  Off when unset.", metavar="PORT",
    ),
    _Option(
        "metrics_host", str, "Address the metrics endpoint listens on.  (127.0.0.1 when unset)",
        metavar="HOST",
    ),
    _Option(
        "alert_smtp_url", str, "Send alerts by e-mail through this server: "
        "smtp://[USER:PASSWORD@]HOST[:PORT], smtps://... (TLS) or smtp+starttls://...",
        metavar="URL",
    ),
    _Option("alert_email_from", str, "Sender address of alert e-mails.", metavar="ADDRESS"),
    _Option(
        "alert_email_to", str, "Recipient of alert e-mails; repeat or separate with commas.",
        metavar="ADDRESS", multiple=True,
    ),
    _Option(
        "alert_webhook_url", str, "POST alerts as JSON to this URL.", metavar="URL",
    ),
    _Option(
        "alert_group_wait", float, "Seconds to collect alerts of a new kind before "
        "sending them as one.", metavar="SECONDS",
    ),
    _Option(
        "alert_repeat_interval", float, "After an alert, the same kind is held back this "
        "many seconds and then reported once with its count.", metavar="SECONDS",
    ),
    _Option(
        "alert_reconnect_threshold", int, "Alert when one connection is lost "
        "this many times within --alert-reconnect-window.", metavar="N",
    ),
    _Option(
        "alert_reconnect_window", float, "The time window of --alert-reconnect-threshold.",
        metavar="SECONDS",
    ),
    _Option(
        "alert_stuck_after", float, "Alert when a handler runs longer than this many "
        "seconds.  (half the consumer timeout when unset)", metavar="SECONDS",
    ),
    _Option(
        "alert_body_chars", int, "How much of a message body an alert "
        "shows.", metavar="N",
    ),
)
_CONCURRENCY = _Option(
    "concurrency", int, "Messages handled at once: for run, by each consumer that sets no "
    "concurrency of its own; for the relay, requests in flight.",
)
_WINDOW = (
    _CONCURRENCY,
    _Option(
        "prefetch", int, "Messages the broker may send ahead (for run: to each consumer that "
        "sets no prefetch of its own).  (the concurrency when unset; never unlimited)",
        limits="; 1<=x<=65535",
    ),
)
# doctor also describes consumers that are not steadyrabbit's, such as seed 1's (prefetch 0).
_DOCTOR_WINDOW = (
    _CONCURRENCY,
    _Option(
        "prefetch", int, "Messages the broker may send ahead; 0 is unlimited, which a "
        "steadyrabbit worker refuses: doctor then names what it leads to.  (the concurrency "
        "when unset)",
    ),
)
_RELAY = (
    _Option(
        "exchange", str, "Bind QUEUE to this exchange (declared durable topic if missing).",
    ),
    _Option("routing_key", str, "Routing key of the binding (with --exchange)."),
    _Option(
        "http_timeout",
        float,
        "Seconds a whole request may take (connect, send, the full answer).",
        aliases=("--timeout",),
    ),
    _Option(
        "max_attempts", int, "Attempts per message (the first included) "
        "before it is dead-lettered.",
    ),
    _Option(
        "retry_delay", str, "Delay before retry 1, 2, ...; repeat or separate with commas; the "
        "last repeats.  (exponential backoff with jitter, 1 s to 300 s, when unset)",
        metavar="SECONDS", multiple=True,
    ),
    _Option(
        "queue_type", click.Choice(["classic", "quorum"]), "Type of the retry and dead-letter "
        "queues (and of QUEUE, if it must be created).",
    ),
)
_DOCTOR = (
    _Option(
        "handler_seconds", float, "How long a handler takes (expected or worst case), "
        "checked against --consumer-timeout with the prefetch.", metavar="S",
    ),
    _Option(
        "management_url", str, "The management HTTP API.  (http://<broker host>:15672 with the "
        "broker URL's credentials when unset)", metavar="URL",
    ),
)
_TOP = (_Option("interval", float, "Seconds between refreshes.", metavar="SECONDS"),)


_Command = Callable[..., None]


def _configured(*groups: tuple[_Option, ...]) -> Callable[[_Command], _Command]:
    """Add the flags of ``groups`` and ``--config``; the command receives them as one validated
    ``config`` (flag > environment > file), with logging configured."""
    options = [option for group in groups for option in group]

    def decorate(fn: _Command) -> _Command:
        @functools.wraps(fn)
        def command(*args: Any, config_file: str | None, **kwargs: Any) -> None:
            given: dict[str, Any] = {}
            for option in options:
                value = kwargs.pop(option.key)
                if value is not None and value != ():
                    given[option.key] = value
            try:
                config = load_config(given, config_file)
            except ConfigurationError as exc:
                # A usage error of this command, with the pointer to its --help.
                raise click.UsageError(str(exc), click.get_current_context()) from None
            _configure_logging(config.log_level, config.log_format)
            fn(*args, config=config, **kwargs)

        decorated: _Command = command
        for option in reversed(options):
            decorated = option.decorate(decorated)
        return click.option(
            "config_file",
            "--config",
            type=click.Path(dir_okay=False),
            metavar="FILE",
            help=f"Read settings from this TOML file (keys as the flags: connect_timeout = 5); "
            f"flags and {ENV_PREFIX}* variables take precedence.  [env {CONFIG_ENV}]",
        )(decorated)

    return decorate


@dataclass(frozen=True)
class _CommandLine:
    """The arguments main() was given, for the workers of ``--processes``."""

    args: tuple[str, ...]


class _JsonFormatter(MaskingFormatter):
    """One JSON object per record, for log shippers; secrets are masked before this runs."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            MaskingFormatter("%(asctime)s %(process)d %(levelname)-7s %(name)s: %(message)s")
        )
    handler.addFilter(MaskingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pika logs every socket error with a traceback; the supervisor reports each one in a line.
    logging.getLogger("pika").setLevel(logging.DEBUG if level == "debug" else logging.CRITICAL)
    # httpx logs every request at INFO: one line per message is noise in a worker's log.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


def _serve(app: App, settings: Settings) -> NoReturn:
    watch_pool()  # a worker of --processes stops when its supervisor is gone
    graceful = run(app, settings)
    if graceful:
        sys.exit(EXIT_OK)
    # A second signal: sync handlers may still run in threads that the interpreter would wait
    # for at exit. The broker redelivers their messages; leave now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    if any(t.name.startswith("steadyrabbit[") for t in threading.enumerate()):
        os._exit(EXIT_FAILURE)
    sys.exit(EXIT_FAILURE)


def _supervise(processes: int, settings: Settings) -> NoReturn:
    """Run ``processes`` workers, each this very command with --processes 1, and exit.

    With a metrics port P, the worker in slot i serves on P + i (with 0, each on a free port):
    one endpoint per process, as Prometheus scrapes them.
    """
    port = settings.metrics_port
    slot_args: Callable[[int], list[str]] | None = None
    if port is not None:
        if port and port + processes - 1 > 65535:
            raise ConfigurationError(
                f"--metrics-port {port} with --processes {processes} needs ports up to "
                f"{port + processes - 1}, past 65535"
            )

        def slot_args(slot: int) -> list[str]:
            return ["--metrics-port", str(port + slot if port else 0)]

    status = run_worker_pool(
        _worker_command(click.get_current_context()),
        processes,
        grace_period=settings.grace_period,
        startup_window=settings.connect_timeout + _STARTUP_MARGIN,
        slot_args=slot_args,
    )
    sys.exit(status)


def _worker_command(ctx: click.Context) -> list[str]:
    """``python -m steadyrabbit`` with the arguments of this command minus --processes."""
    given = ctx.find_root().obj
    if not isinstance(given, _CommandLine) or not sys.executable:
        raise ConfigurationError("--processes works only from the command line (main())")
    # Each worker is told --processes 1 explicitly: the count may have come from the
    # environment or the config file, which the workers inherit.
    args = [*without_option(given.args, "--processes"), "--processes", "1"]
    # The workers must parse exactly these options; an option value spelled "--processes"
    # would have been taken out too.
    expected = {**ctx.params, "processes": 1}
    if args[:1] != [ctx.info_name] or _parse(ctx, args[1:]) != expected:
        raise ConfigurationError(
            "cannot make the workers' command line: an option value looks like --processes"
        )
    return [sys.executable, "-m", "steadyrabbit", *args]


def _parse(ctx: click.Context, args: list[str]) -> dict[str, Any]:
    with ctx.command.make_context(ctx.info_name, args, parent=ctx.parent) as parsed:
        return dict(parsed.params)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="steadyrabbit")
def cli() -> None:
    """RabbitMQ consumers with slow handlers, made safe."""


@cli.command("run")
@click.argument("target", metavar="MODULE:APP")
@_configured(_BROKER, _WORKER, _WINDOW)
def run_command(target: str, config: Config) -> None:
    """Run the steadyrabbit App named MODULE:APP (e.g. myproject.workers:app).

    --concurrency and --prefetch (or their variables or config-file keys) apply to the
    consumers that set no concurrency or prefetch of their own.
    """
    settings = config.settings()
    _refuse_unlimited_prefetch(config)
    if config.processes > 1:
        _supervise(config.processes, settings)  # the workers import the app, not the supervisor
    _warn_unused(config, "run", _RELAY, "relay settings")
    app = load_app(target)
    _apply_window(app, config)
    _serve(app, settings)


def _refuse_unlimited_prefetch(config: Config) -> None:
    if config.prefetch == 0:
        raise ConfigurationError(
            f"{config.source('prefetch')}: 0 means unlimited prefetch, which a steadyrabbit "
            "worker never uses (only doctor accepts it, to describe a consumer that does)"
        )


def _apply_window(app: App, config: Config) -> None:
    """The given --concurrency and --prefetch become the defaults of the app's consumers."""
    given = config.sources(("concurrency", "prefetch"))
    if not given:
        return
    try:
        app.apply_defaults(
            concurrency=config.concurrency if "concurrency" in given else None,
            prefetch=config.prefetch if "prefetch" in given else None,
        )
    except ConfigurationError as exc:
        raise ConfigurationError(f"{' and '.join(given.values())}: {exc}") from None


def _warn_unused(config: Config, command: str, options: Sequence[_Option], what: str) -> None:
    """One warning line naming the settings of ``options`` that the environment or the config
    file gave, which ``command`` has no use for (one file may serve every command)."""
    unused = config.sources(option.key for option in options)
    if unused:
        logging.getLogger("steadyrabbit").warning(
            "%s does not use %s: %s (the app's code sets its own)",
            command, ", ".join(unused.values()), what,
        )  # fmt: skip


@cli.command("relay")
@click.argument("queue")
@click.argument("target_url")
@_configured(_BROKER, _WORKER, _WINDOW, _RELAY)
def relay_command(queue: str, target_url: str, config: Config) -> None:
    """Consume QUEUE and POST every message to TARGET_URL.

    A 2xx answer acks the message. 408, 429, 5xx, a timeout or an unreachable target retry it
    later (honouring Retry-After), up to --max-attempts; any other answer sends it to QUEUE.dlq
    with the status and the start of the response.
    """
    settings = config.settings()
    _refuse_unlimited_prefetch(config)
    if config.exchange is not None and config.routing_key is None:
        raise ConfigurationError("--exchange needs --routing-key")
    if config.routing_key is not None and config.exchange is None:
        raise ConfigurationError("--routing-key needs --exchange")
    app = relay_app(
        queue,
        target_url,
        timeout=config.http_timeout,
        concurrency=config.concurrency,
        prefetch=config.prefetch,
        exchange=config.exchange,
        routing_key=config.routing_key,
        retry=RetryPolicy(max_attempts=config.max_attempts, delays=config.retry_delay or None),
        queue_type=config.queue_type,
    )
    if config.processes > 1:
        _supervise(config.processes, settings)
    _serve(app, settings)


# -- dlq: look into, replay and purge <queue>.dlq ------------------------------------------------


@cli.group("dlq")
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
@_configured(_BROKER)
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
@_configured(_BROKER)
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


# Exit status of a replay stopped by a signal: the shell's 128 + the signal's number.
_EXIT_SIGNALLED = 128


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
@_configured(_BROKER)
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
        sys.exit(_EXIT_SIGNALLED + signals[0])
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
@_configured(_BROKER)
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


# -- doctor: check the broker, the queues and these settings -----------------------------------


@cli.command("doctor")
@click.argument("queues", nargs=-1, metavar="[QUEUE]...")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_configured(_BROKER, _WORKER, _DOCTOR_WINDOW, _RELAY, _DOCTOR)
def doctor_command(queues: tuple[str, ...], as_json: bool, config: Config) -> None:
    """Check the broker, each QUEUE and these worker settings before running a worker.

    Connects as a worker with the same options would and reports, as a checklist (or JSON):
    the server, the negotiated heartbeat, each queue (type, arguments, counts, consumers and
    their prefetch, dead-letter and retry queues), whether a prefetched message would wait
    past consumer_timeout, alarms and blocked connections, each with a one-line fix. Works
    without the management plugin, listing what it could not check. Exit status 1 when a
    finding is critical. Takes every option of `run` and `relay`, so that a worker's command
    line (or config file) can be checked as it is.
    """
    report = asyncio.run(
        diagnose(
            config.settings(),
            queues,
            prefetch=config.prefetch,
            concurrency=config.concurrency,
            handler_seconds=config.handler_seconds,
            management_url=config.management_url,
        )
    )
    unicode = can_encode(sys.stdout)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=not unicode))
    else:
        click.echo(format_report(report, unicode=unicode))
    if report.critical:
        sys.exit(EXIT_FAILURE)


# -- demo: the quick start ----------------------------------------------------------------------


@cli.command("demo")
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
@_configured(_BROKER)
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


# -- top: watch a running worker ---------------------------------------------------------------


@cli.command("top")
@click.argument("url", metavar="METRICS_URL")
@click.option("--once", is_flag=True, help="Print one frame (averages since start) and exit.")
@_configured(_TOP)
def top_command(url: str, once: bool, config: Config) -> None:
    """Watch a running worker: throughput, handlers in flight and their age against
    consumer_timeout, retries, dead letters and reconnects.

    METRICS_URL is the worker's metrics endpoint (--metrics-port): http://HOST:PORT, HOST:PORT
    or just PORT on this machine. Ctrl-C ends it.
    """
    run_top(url, interval=config.interval, once=once)


def load_app(target: str) -> App:
    """Import ``module:attribute`` and return the :class:`App` (or the App a factory returns)."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"{target!r} is not of the form MODULE:APP")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigurationError(f"cannot import module {module_name!r}: {exc}") from None
        raise ConfigurationError(f"importing {module_name!r} failed: {_where(exc)}") from exc
    except Exception as exc:  # user code: whatever it raises, say where, in one line
        raise ConfigurationError(f"importing {module_name!r} failed: {_where(exc)}") from exc
    try:
        obj = getattr(module, attribute)
    except AttributeError:
        raise ConfigurationError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not isinstance(obj, App) and callable(obj):
        try:
            obj = obj()
        except Exception as exc:  # user code, as above
            raise ConfigurationError(
                f"calling the factory {target!r} with no arguments failed: {_where(exc)}"
            ) from exc
    if not isinstance(obj, App):
        raise ConfigurationError(f"{target!r} is a {type(obj).__name__}, not a steadyrabbit App")
    return obj


def _where(exc: BaseException) -> str:
    """``Type: message (file:line)`` of the innermost frame: a traceback in one line."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    place = f" ({tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})" if tb is not None else ""
    return f"{type(exc).__name__}: {exc}{place}"


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point: every error ends in one line on stderr and a non-zero exit status."""
    given = _CommandLine(tuple(argv if argv is not None else sys.argv[1:]))
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="steadyrabbit",
                 standalone_mode=False, obj=given)
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        _fail(f"{exc.format_message()}{hint}", EXIT_USAGE)
    except click.ClickException as exc:
        _fail(exc.format_message(), EXIT_USAGE)
    except click.Abort:
        _fail("aborted", EXIT_FAILURE)
    except ConfigurationError as exc:
        _fail(str(exc), EXIT_USAGE)
    except SteadyRabbitError as exc:
        _fail(str(exc), EXIT_FAILURE)
    sys.exit(EXIT_OK)


def _fail(message: str, status: int) -> NoReturn:
    # Several problems (a configuration with two bad values) are one line each, each marked.
    for line in mask_url(message).splitlines() or [""]:
        click.echo(f"steadyrabbit: error: {line}", err=True)
    sys.exit(status)
