"""The command line: a thin layer over :func:`steadyrabbit.run` and :func:`relay_app`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, NoReturn, TypeVar

import click

from ._app import App
from ._dlq import (
    DeadLetterReport,
    ReplayResult,
    body_preview,
    dead_letter_queue,
    list_dead_letters,
    purge_dead_letters,
    replay_dead_letters,
)
from ._doctor import can_encode, diagnose, format_report
from ._errors import ClosedByUserError, ConfigurationError, SteadyRabbitError
from ._processes import supervise, watch_supervisor, without_option
from ._relay import relay_app
from ._retry import RetryPolicy
from ._settings import DEFAULT_URL, Settings
from ._url import mask_url
from ._worker import run

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# With --processes, a worker that exits with status 1 within the connect timeout plus this long
# of its start never got up (bad credentials, no broker): every worker would fail the same way.
_STARTUP_MARGIN = 10.0


def _connection_options(fn: Callable[..., None]) -> Callable[..., None]:
    """The broker and logging options every command takes. The command receives them as one
    validated ``settings`` argument, with logging already configured."""

    @functools.wraps(fn)
    def command(
        *args: Any,
        urls: tuple[str, ...],
        heartbeat: int,
        connect_timeout: float,
        grace_period: float,
        consumer_timeout: float,
        log_level: str,
        **kwargs: Any,
    ) -> None:
        settings = _settings(urls, heartbeat, connect_timeout, grace_period, consumer_timeout)
        _configure_logging(log_level)
        fn(*args, settings=settings, **kwargs)

    options = [
        click.option(
            "--url",
            "urls",
            multiple=True,
            envvar="STEADYRABBIT_URL",
            metavar="URL",
            help="Broker URL; repeat (or separate with commas) for several nodes, tried in turn. "
            f"[env STEADYRABBIT_URL; default {mask_url(DEFAULT_URL)}]",
        ),
        click.option(
            "--heartbeat",
            type=click.IntRange(0, 65535),
            default=15,
            show_default=True,
            help="AMQP heartbeat in seconds; a dead peer is noticed after about two. "
            "0 turns it off (not recommended).",
        ),
        click.option(
            "--connect-timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=60.0,
            show_default=True,
            help="At startup, give up when no broker answered within this many seconds; "
            "once connected, reconnection never gives up.",
        ),
        click.option(
            "--grace-period",
            type=click.FloatRange(min=0),
            default=30.0,
            show_default=True,
            help="On SIGTERM/SIGINT, seconds running handlers get to finish.",
        ),
        click.option(
            "--consumer-timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=1800.0,
            show_default=True,
            help="The broker's consumer_timeout in seconds (RabbitMQ default 1800); prefetched "
            "messages that wait half of it unstarted go back to the queue.",
        ),
        click.option(
            "--log-level",
            type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
            default="info",
            show_default=True,
        ),
        click.option(
            "--log-format",
            type=click.Choice(["plain", "json"]),
            default="plain",
            show_default=True,
            envvar="STEADYRABBIT_LOG_FORMAT",
            expose_value=False,
            callback=_remember_log_format,
            help="json: one JSON object per line (time, level, logger, pid, message, error). "
            "[env STEADYRABBIT_LOG_FORMAT]",
        ),
    ]
    decorated: Callable[..., None] = command
    for option in reversed(options):
        decorated = option(decorated)
    return decorated


def _processes_option(fn: F) -> F:
    return click.option(
        "--processes",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        metavar="N",
        help="Run N worker processes, each with its own connection, under a supervisor that "
        "restarts one that dies and passes SIGTERM/SIGINT on (signal the supervisor only; "
        "systemd: KillMode=mixed).",
    )(fn)


def _metrics_options(fn: F) -> F:
    fn = click.option(
        "--metrics-host",
        metavar="HOST",
        default=None,
        help="Address the metrics endpoint listens on.  [default: 127.0.0.1]",
    )(fn)
    return click.option(
        "--metrics-port",
        type=click.IntRange(0, 65535),
        default=None,
        metavar="PORT",
        help="Serve Prometheus /metrics, /healthz and /readyz over HTTP on this port "
        "(0: a free port, logged).  [default: off]",
    )(fn)


def _with_metrics(
    settings: Settings, processes: int, port: int | None, host: str | None
) -> Settings:
    if port is None:
        if host is not None:
            raise ConfigurationError("--metrics-host needs --metrics-port")
        return settings
    if processes > 1:
        raise ConfigurationError(
            "--metrics-port serves one worker process: it cannot be combined with --processes"
        )
    return replace(settings, metrics_port=port, metrics_host=host or settings.metrics_host)


@dataclass(frozen=True)
class _CommandLine:
    """The arguments main() was given, for the workers of ``--processes``."""

    args: tuple[str, ...]


def _window_options(fn: F) -> F:
    """--concurrency and --prefetch, as a worker (or the relay) uses them."""
    fn = click.option(
        "--prefetch",
        type=click.IntRange(1, 65535),
        default=None,
        help="Messages the broker may send ahead (default: the concurrency; never unlimited).",
    )(fn)
    return click.option(
        "--concurrency",
        type=click.IntRange(1, 65535),
        default=1,
        show_default=True,
        help="Messages handled at once (for the relay: requests in flight).",
    )(fn)


def _settings(
    urls: Sequence[str],
    heartbeat: int,
    connect_timeout: float,
    grace_period: float,
    consumer_timeout: float,
) -> Settings:
    split = tuple(part.strip() for url in urls for part in url.split(",") if part.strip())
    return Settings(
        urls=split or (DEFAULT_URL,),
        heartbeat=heartbeat,
        connect_timeout=connect_timeout,
        grace_period=grace_period,
        consumer_timeout=consumer_timeout,
    )


class _MaskSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_url(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


class _JsonFormatter(logging.Formatter):
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
            entry["error"] = mask_url(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def _remember_log_format(ctx: click.Context, _param: click.Parameter, value: str) -> str:
    ctx.meta["steadyrabbit.log_format"] = value
    return value


def _configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    context = click.get_current_context(silent=True)
    log_format = context.meta.get("steadyrabbit.log_format") if context else None
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(process)d %(levelname)-7s %(name)s: %(message)s")
        )
    handler.addFilter(_MaskSecrets())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pika logs every socket error with a traceback; the supervisor reports each one in a line.
    logging.getLogger("pika").setLevel(logging.DEBUG if level == "debug" else logging.CRITICAL)
    # httpx logs every request at INFO: one line per message is noise in a worker's log.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


def _serve(app: App, settings: Settings) -> NoReturn:
    watch_supervisor()  # a worker of --processes stops when its supervisor is gone
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
    """Run ``processes`` workers, each this very command without --processes, and exit."""
    status = supervise(
        _worker_command(click.get_current_context()),
        processes,
        grace_period=settings.grace_period,
        startup_window=settings.connect_timeout + _STARTUP_MARGIN,
    )
    sys.exit(status)


def _worker_command(ctx: click.Context) -> list[str]:
    """``python -m steadyrabbit`` with the arguments of this command minus --processes."""
    given = ctx.find_root().obj
    if not isinstance(given, _CommandLine) or not sys.executable:
        raise ConfigurationError("--processes works only from the command line (main())")
    args = without_option(given.args, "--processes")
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
@_processes_option
@_metrics_options
@_connection_options
def run_command(
    target: str,
    processes: int,
    metrics_port: int | None,
    metrics_host: str | None,
    settings: Settings,
) -> None:
    """Run the steadyrabbit App named MODULE:APP (e.g. myproject.workers:app)."""
    settings = _with_metrics(settings, processes, metrics_port, metrics_host)
    if processes > 1:
        _supervise(processes, settings)  # the workers import the app, not the supervisor
    _serve(load_app(target), settings)


@cli.command("relay")
@click.argument("queue")
@click.argument("target_url")
@click.option("--exchange", help="Bind QUEUE to this exchange (declared durable topic if missing).")
@click.option("--routing-key", help="Routing key of the binding (with --exchange).")
@_window_options
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="HTTP timeout in seconds.",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Attempts per message (the first included) before it is dead-lettered.",
)
@click.option(
    "--retry-delay",
    "retry_delays",
    multiple=True,
    metavar="SECONDS",
    help="Delay before retry 1, 2, ...; repeat or separate with commas; the last repeats. "
    "[default: exponential backoff with jitter, 1 s to 300 s]",
)
@click.option(
    "--queue-type",
    type=click.Choice(["classic", "quorum"]),
    default="classic",
    show_default=True,
    help="Type of the retry and dead-letter queues (and of QUEUE, if it must be created).",
)
@_processes_option
@_metrics_options
@_connection_options
def relay_command(
    queue: str,
    target_url: str,
    exchange: str | None,
    routing_key: str | None,
    concurrency: int,
    prefetch: int | None,
    timeout: float,
    max_attempts: int,
    retry_delays: tuple[str, ...],
    queue_type: str,
    processes: int,
    metrics_port: int | None,
    metrics_host: str | None,
    settings: Settings,
) -> None:
    """Consume QUEUE and POST every message to TARGET_URL.

    A 2xx answer acks the message. 408, 429, 5xx, a timeout or an unreachable target retry it
    later (honouring Retry-After), up to --max-attempts; any other answer sends it to QUEUE.dlq
    with the status and the start of the response.
    """
    settings = _with_metrics(settings, processes, metrics_port, metrics_host)
    if exchange is not None and routing_key is None:
        raise ConfigurationError("--exchange needs --routing-key")
    if routing_key is not None and exchange is None:
        raise ConfigurationError("--routing-key needs --exchange")
    app = relay_app(
        queue,
        target_url,
        timeout=timeout,
        concurrency=concurrency,
        prefetch=prefetch,
        exchange=exchange,
        routing_key=routing_key,
        retry=RetryPolicy(max_attempts=max_attempts, delays=_delays(retry_delays)),
        queue_type=queue_type,
    )
    if processes > 1:
        _supervise(processes, settings)
    _serve(app, settings)


def _delays(values: tuple[str, ...]) -> tuple[float, ...] | None:
    parts = [part.strip() for value in values for part in value.split(",") if part.strip()]
    if not parts:
        return None
    try:
        delays = tuple(float(part) for part in parts)
    except ValueError:
        raise ConfigurationError(
            f"--retry-delay takes seconds, like 5 or 0.5,30,300; got {', '.join(parts)!r}"
        ) from None
    if any(not (delay >= 0 and math.isfinite(delay)) for delay in delays):
        raise ConfigurationError("--retry-delay values must be >= 0 seconds")
    return delays


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
@_connection_options
def dlq_list_command(
    queue: str,
    limit: int,
    as_json: bool,
    settings: Settings,
) -> None:
    """Show how many messages QUEUE.dlq holds and the first of them, leaving them in place.

    QUEUE is the original queue's name.
    """
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
        click.echo(_dlq_table(report))


_REASON_CHARS = 40
_EXCEPTION_CHARS = 30


def _dlq_table(report: DeadLetterReport) -> str:
    if report.count == 0:
        return f"{report.dead_letter_queue} is empty"
    noun = "message" if report.count == 1 else "messages"
    head = f"{report.dead_letter_queue}: {report.count} {noun}"
    if len(report.entries) < report.count:
        head += f" (showing the first {len(report.entries)}; see --limit)"
    if not report.entries:
        return head
    rows = [("#", "FAILED AT", "ATTEMPTS", "EXCEPTION", "REASON", "BODY")]
    for entry in report.entries:
        rows.append(
            (
                str(entry.position),
                entry.failed_at or "-",
                "-" if entry.attempts is None else str(entry.attempts),
                body_preview(entry.exception or "-", _EXCEPTION_CHARS),
                body_preview(entry.reason or "-", _REASON_CHARS),
                entry.body_preview,
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    lines = [head]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def _confirmed(
    yes: bool, action: str, settings: Settings, queue: str, question: Callable[[int], str]
) -> bool:
    """Whether to go ahead. Without --yes, ask on a terminal, and refuse when nobody can answer.

    False when the dead-letter queue turned out empty (nothing to ask about); no is click.Abort.
    """
    if yes:
        return True
    dlq = dead_letter_queue(queue)
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
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@_connection_options
def dlq_replay_command(
    queue: str,
    limit: int | None,
    error_filter: str | None,
    yes: bool,
    settings: Settings,
) -> None:
    """Move the messages of QUEUE.dlq back to the queue they failed in, to be consumed again.

    Each one is published (persistent, with its properties and headers, without steadyrabbit's
    failure headers) and removed from QUEUE.dlq only once the broker confirmed it. Only the
    messages present at the start are replayed. The first SIGINT or SIGTERM stops after the
    message in hand; run the command again to replay the rest.
    """
    dlq = dead_letter_queue(queue)

    def question(count: int) -> str:
        some = f"up to {limit} of the" if limit is not None and limit < count else "the"
        return f"Replay {some} {count} messages of {dlq} to their queues?"

    if not _confirmed(yes, "replay", settings, queue, question):
        return
    with _ReplayProgress(f"replaying {dlq}") as progress:
        result = asyncio.run(_replay(settings, queue, limit, error_filter, progress))
    click.echo(_replay_summary(result, error_filter))


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
    progress: Callable[[int, int], None],
) -> ReplayResult:
    """Run the replay; the first SIGINT/SIGTERM sets its stop event, a second one aborts it."""
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
        return await replay_dead_letters(
            settings, queue, limit=limit, error_filter=error_filter, progress=progress, stop=stop
        )
    except asyncio.CancelledError:
        if len(signals) > 1:
            raise ClosedByUserError(
                f"replay aborted by a second signal; the message in flight, if any, may now be "
                f"both in its queue and in {dead_letter_queue(queue)}"
            ) from None
        raise
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


def _replay_summary(result: ReplayResult, error_filter: str | None) -> str:
    dlq = result.dead_letter_queue
    text = f"replayed {result.replayed} of {result.total} messages from {dlq}"
    if error_filter is not None:
        text += f" ({result.skipped} skipped: error does not contain {error_filter!r})"
    text += f"; {result.remaining} remain in {dlq}"
    if result.stopped:
        text = f"stopped by a signal: {text}"
    return text


@dlq_group.command("purge")
@click.argument("queue")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@_connection_options
def dlq_purge_command(
    queue: str,
    yes: bool,
    settings: Settings,
) -> None:
    """Delete every message of QUEUE.dlq. Asks first, unless --yes."""
    dlq = dead_letter_queue(queue)

    def question(count: int) -> str:
        return f"Delete the {count} messages of {dlq}? This cannot be undone."

    if not _confirmed(yes, "purge", settings, queue, question):
        return
    purged = asyncio.run(purge_dead_letters(settings, queue))
    click.echo(f"purged {purged} {'message' if purged == 1 else 'messages'} from {dlq}")


# -- doctor: check the broker, the queues and these settings -----------------------------------


@cli.command("doctor")
@click.argument("queues", nargs=-1, metavar="[QUEUE]...")
@_window_options
@click.option(
    "--handler-seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="S",
    help="How long a handler takes (expected or worst case), checked against "
    "--consumer-timeout with the prefetch.",
)
@click.option(
    "--management-url",
    metavar="URL",
    help="The management HTTP API.  [default: http://<broker host>:15672 with the broker "
    "URL's credentials]",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_connection_options
def doctor_command(
    queues: tuple[str, ...],
    concurrency: int,
    prefetch: int | None,
    handler_seconds: float | None,
    management_url: str | None,
    as_json: bool,
    settings: Settings,
) -> None:
    """Check the broker, each QUEUE and these worker settings before running a worker.

    Connects as a worker with the same options would and reports, as a checklist (or JSON):
    the server, the negotiated heartbeat, each queue (type, arguments, counts, consumers and
    their prefetch, dead-letter and retry queues), whether a prefetched message would wait
    past consumer_timeout, alarms and blocked connections, each with a one-line fix. Works
    without the management plugin, listing what it could not check. Exit status 1 when a
    finding is critical.
    """
    report = asyncio.run(
        diagnose(
            settings,
            queues,
            prefetch=prefetch,
            concurrency=concurrency,
            handler_seconds=handler_seconds,
            management_url=management_url,
        )
    )
    unicode = can_encode(sys.stdout)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=not unicode))
    else:
        click.echo(format_report(report, unicode=unicode))
    if report.critical:
        sys.exit(EXIT_FAILURE)


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
    click.echo(f"steadyrabbit: error: {mask_url(message)}", err=True)
    sys.exit(status)
