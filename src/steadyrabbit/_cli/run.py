"""``steadyrabbit run`` and ``steadyrabbit relay``: a worker in the foreground, or a pool of
them with ``--processes``."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import click

from .._app import App
from .._config import Config
from .._errors import ConfigurationError
from .._ops.processes import run_worker_pool, watch_pool, without_option
from .._ops.relay import relay_app
from .._retry import RetryPolicy
from .._settings import Settings
from .._worker import run
from .exits import EXIT_FAILURE, EXIT_OK
from .options import BROKER, RELAY, WINDOW, WORKER, Option, configured

__all__ = ["CommandLine", "load_app", "relay_command", "run_command"]


# With --processes, a worker that exits with status 1 within the connect timeout plus this long
# of its start never got up (bad credentials, no broker): every worker would fail the same way.
_STARTUP_MARGIN = 10.0


@dataclass(frozen=True)
class CommandLine:
    """The arguments main() was given, for the workers of ``--processes``."""

    args: tuple[str, ...]


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


def _run_pool(processes: int, settings: Settings) -> NoReturn:
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
    if not isinstance(given, CommandLine) or not sys.executable:
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


@click.command("run")
@click.argument("target", metavar="MODULE:APP")
@configured(BROKER, WORKER, WINDOW)
def run_command(target: str, config: Config) -> None:
    """Run the steadyrabbit App named MODULE:APP (e.g. myproject.workers:app).

    --concurrency and --prefetch (or their variables or config-file keys) apply to the
    consumers that set no concurrency or prefetch of their own.
    """
    settings = config.settings()
    _refuse_unlimited_prefetch(config)
    if config.processes > 1:
        _run_pool(config.processes, settings)  # the workers import the app, not the supervisor
    _warn_unused(config, "run", RELAY, "relay settings")
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


def _warn_unused(config: Config, command: str, options: Sequence[Option], what: str) -> None:
    """One warning line naming the settings of ``options`` that the environment or the config
    file gave, which ``command`` has no use for (one file may serve every command)."""
    unused = config.sources(option.key for option in options)
    if unused:
        logging.getLogger("steadyrabbit").warning(
            "%s does not use %s: %s (the app's code sets its own)",
            command, ", ".join(unused.values()), what,
        )  # fmt: skip


@click.command("relay")
@click.argument("queue")
@click.argument("target_url")
@configured(BROKER, WORKER, WINDOW, RELAY)
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
        _run_pool(config.processes, settings)
    _serve(app, settings)


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

