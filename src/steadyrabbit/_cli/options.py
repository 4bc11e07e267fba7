"""The command-line flags, one table per group of settings, and the decorator that gives a
command its flags and hands it one validated :class:`Config`.

Flags are parsed as plain values; their limits are :class:`Config`'s, checked and shown in
``--help`` from there, so that a flag, an environment variable and a config-file key are held to
the same ones.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import annotated_types
import click

from .._config import CONFIG_ENV, ENV_PREFIX, Config, env_name, flag, load_config
from .._errors import ConfigurationError
from .._url import mask_url
from .logs import configure_logging

__all__ = [
    "BROKER",
    "DOCTOR",
    "DOCTOR_WINDOW",
    "RELAY",
    "TOP",
    "WINDOW",
    "WORKER",
    "Option",
    "configured",
]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Option:
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


BROKER = (
    Option(
        "url", str, "Broker URL; repeat (or separate with commas) for several nodes, tried in "
        "turn.", metavar="URL", multiple=True,
    ),
    Option(
        "heartbeat", int, "AMQP heartbeat in seconds; a dead peer is "
        "noticed after about two. 0 turns it off (not recommended).",
    ),
    Option(
        "connect_timeout", float, "At startup, give up when no broker answered within this "
        "many seconds; once connected, reconnection never gives up.",
    ),
    Option(
        "log_level", click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
        "Log level.",
    ),
    Option(
        "log_format", click.Choice(["plain", "json"]), "json: one JSON object per line (time, "
        "level, logger, pid, message, error).",
    ),
)
WORKER = (
    Option(
        "grace_period", float, "On SIGTERM/SIGINT, seconds running handlers "
        "get to finish.",
    ),
    Option(
        "consumer_timeout", float, "The broker's consumer_timeout in seconds (RabbitMQ "
        "default 1800); prefetched messages that wait half of it unstarted go back to the queue.",
    ),
    Option(
        "state_dir", click.Path(file_okay=False), "Where crash-loop records of classic-queue "
        "messages are kept.  (~/.local/state/steadyrabbit when unset)", metavar="DIR",
    ),
    Option(
        "processes", int, "Run N worker processes, each with its own "
        "connection, under a supervisor that restarts one that dies and passes SIGTERM/SIGINT "
        "on (signal the supervisor only; systemd: KillMode=mixed).", metavar="N",
    ),
    Option(
        "metrics_port", int, "Serve Prometheus /metrics, /healthz, "
        "/readyz, /status.json and a status page (/) over HTTP on this port (0: a free port, "
        "logged); with --processes N, worker i on PORT+i.  Off when unset.", metavar="PORT",
    ),
    Option(
        "metrics_host", str, "Address the metrics endpoint listens on.  (127.0.0.1 when unset)",
        metavar="HOST",
    ),
    Option(
        "idempotency", click.BOOL, "Run a message with a message_id at most once to "
        "completion: a copy of one that completed is acked without running.", metavar="yes|no",
    ),
    Option(
        "idempotency_store", str, "Where leases and done records live: postgresql://... or "
        "redis://... for workers on many hosts.  (a SQLite file in --state-dir when unset)",
        metavar="URL",
    ),
    Option(
        "idempotency_retention", float, "Seconds a done record is kept.", metavar="SECONDS",
    ),
    Option(
        "lease", float, "Seconds a run's lease lasts unless renewed; a worker that died "
        "holding one is taken over when it expires.", metavar="SECONDS",
    ),
    Option(
        "alert_smtp_url", str, "Send alerts by e-mail through this server: "
        "smtp://[USER:PASSWORD@]HOST[:PORT], smtps://... (TLS) or smtp+starttls://...",
        metavar="URL",
    ),
    Option("alert_email_from", str, "Sender address of alert e-mails.", metavar="ADDRESS"),
    Option(
        "alert_email_to", str, "Recipient of alert e-mails; repeat or separate with commas.",
        metavar="ADDRESS", multiple=True,
    ),
    Option(
        "alert_webhook_url", str, "POST alerts as JSON to this URL.", metavar="URL",
    ),
    Option(
        "alert_group_wait", float, "Seconds to collect alerts of a new kind before "
        "sending them as one.", metavar="SECONDS",
    ),
    Option(
        "alert_repeat_interval", float, "After an alert, the same kind is held back this "
        "many seconds and then reported once with its count.", metavar="SECONDS",
    ),
    Option(
        "alert_reconnect_threshold", int, "Alert when one connection is lost "
        "this many times within --alert-reconnect-window.", metavar="N",
    ),
    Option(
        "alert_reconnect_window", float, "The time window of --alert-reconnect-threshold.",
        metavar="SECONDS",
    ),
    Option(
        "alert_stuck_after", float, "Alert when a handler runs longer than this many "
        "seconds.  (half the consumer timeout when unset)", metavar="SECONDS",
    ),
    Option(
        "alert_body_chars", int, "How much of a message body an alert "
        "shows.", metavar="N",
    ),
)
CONCURRENCY = Option(
    "concurrency", int, "Messages handled at once: for run, by each consumer that sets no "
    "concurrency of its own; for the relay, requests in flight.",
)
WINDOW = (
    CONCURRENCY,
    Option(
        "prefetch", int, "Messages the broker may send ahead (for run: to each consumer that "
        "sets no prefetch of its own).  (the concurrency when unset; never unlimited)",
        limits="; 1<=x<=65535",
    ),
)
# doctor also describes consumers that are not steadyrabbit's, such as seed 1's (prefetch 0).
DOCTOR_WINDOW = (
    CONCURRENCY,
    Option(
        "prefetch", int, "Messages the broker may send ahead; 0 is unlimited, which a "
        "steadyrabbit worker refuses: doctor then names what it leads to.  (the concurrency "
        "when unset)",
    ),
)
RELAY = (
    Option(
        "exchange", str, "Bind QUEUE to this exchange (declared durable topic if missing).",
    ),
    Option("routing_key", str, "Routing key of the binding (with --exchange)."),
    Option(
        "http_timeout",
        float,
        "Seconds a whole request may take (connect, send, the full answer).",
        aliases=("--timeout",),
    ),
    Option(
        "max_attempts", int, "Attempts per message (the first included) "
        "before it is dead-lettered.",
    ),
    Option(
        "retry_delay", str, "Delay before retry 1, 2, ...; repeat or separate with commas; the "
        "last repeats.  (exponential backoff with jitter, 1 s to 300 s, when unset)",
        metavar="SECONDS", multiple=True,
    ),
    Option(
        "queue_type", click.Choice(["classic", "quorum"]), "Type of the retry and dead-letter "
        "queues (and of QUEUE, if it must be created).",
    ),
)
DOCTOR = (
    Option(
        "handler_seconds", float, "How long a handler takes (expected or worst case), "
        "checked against --consumer-timeout with the prefetch.", metavar="S",
    ),
    Option(
        "management_url", str, "The management HTTP API.  (http://<broker host>:15672 with the "
        "broker URL's credentials when unset)", metavar="URL",
    ),
)
TOP = (Option("interval", float, "Seconds between refreshes.", metavar="SECONDS"),)


_Command = Callable[..., None]


def configured(*groups: tuple[Option, ...]) -> Callable[[_Command], _Command]:
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
            configure_logging(config.log_level, config.log_format)
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

