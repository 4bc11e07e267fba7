"""Deployment settings of a worker: where the brokers are and how patient to be with them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from ._alert_settings import AlertSettings
from ._errors import ConfigurationError
from ._url import BrokerAddress, mask_url, parse_url

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"


@dataclass(frozen=True, init=False)
class Settings:
    """How a :class:`Worker` connects and behaves. Validated on creation.

    ``url`` (or ``urls``, the same; give one of them): brokers tried in turn (several nodes of
    one cluster), one URL or a sequence of them; ``settings.urls`` and ``settings.url`` are the
    tuple.
    ``heartbeat``: seconds; a dead peer is noticed after about two intervals. 0 disables it, which
    hides a dead broker for as long as the kernel keeps the socket (minutes): not recommended.
    ``connect_timeout``: at startup, give up if no broker accepted a connection within this many
    seconds; once connected, reconnection never gives up.
    ``grace_period``: on shutdown, how long running handlers may take to finish.
    ``consumer_timeout``: the broker's delivery acknowledgement timeout in seconds (RabbitMQ's
    default is 30 minutes); prefetched messages that waited half of it unstarted are returned.
    ``state_dir``: where the record of redelivered classic-queue messages is kept (crash-loop
    detection); default ``$STEADYRABBIT_STATE_DIR`` or ``~/.local/state/steadyrabbit``.
    ``metrics_port``: serve ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz`` over HTTP on
    this port of ``metrics_host`` while the worker runs; 0 picks a free port (logged, and in
    :attr:`Worker.metrics_address`); None (the default) serves nothing and costs nothing.
    ``alerts``: e-mail and/or webhook alerts on dead letters, repeated reconnects and stuck
    handlers (see :class:`AlertSettings`); None (the default) runs nothing and costs nothing.
    ``idempotency``: a message with a ``message_id`` runs at most once to completion: a copy
    of one that completed is acked without running, one that arrives while it runs waits
    (see the README). False turns that off; long runs are still handed off.
    ``idempotency_store``: where leases and done records live: None (the default) a SQLite
    file in ``state_dir``, for one host; ``postgresql://...`` or ``redis://...`` for many.
    ``idempotency_retention``: how long a done record is kept, in seconds (7 days).
    ``lease``: seconds a run's lease lasts unless renewed (every third of it, while it runs);
    a worker that died holding one is taken over when it expires.
    """

    urls: tuple[str, ...] = (DEFAULT_URL,)
    heartbeat: int = 15
    connect_timeout: float = 60.0
    grace_period: float = 30.0
    consumer_timeout: float = 1800.0
    reconnect_delay: float = 0.5
    reconnect_delay_max: float = 30.0
    loop_lag_threshold: float = 1.0
    name: str = "steadyrabbit"
    state_dir: Path | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    alerts: AlertSettings | None = None
    idempotency: bool = True
    idempotency_store: str | None = None
    idempotency_retention: float = 7 * 86400.0
    lease: float = 30.0
    addresses: tuple[BrokerAddress, ...] = field(init=False, repr=False, compare=False)

    # Written out (not generated) for ``url``, the name the README, the flags and the config
    # file use, next to the field ``urls``. The parameters are the fields, in their order.
    def __init__(
        self,
        urls: str | Sequence[str] | None = None,
        heartbeat: int = 15,
        connect_timeout: float = 60.0,
        grace_period: float = 30.0,
        consumer_timeout: float = 1800.0,
        reconnect_delay: float = 0.5,
        reconnect_delay_max: float = 30.0,
        loop_lag_threshold: float = 1.0,
        name: str = "steadyrabbit",
        state_dir: Path | None = None,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        alerts: AlertSettings | None = None,
        idempotency: bool = True,
        idempotency_store: str | None = None,
        idempotency_retention: float = 7 * 86400.0,
        lease: float = 30.0,
        *,
        url: str | Sequence[str] | None = None,
    ) -> None:
        if url is not None and urls is not None:
            raise ConfigurationError("give the broker URLs as url or as urls, not both")
        given = urls if urls is not None else url
        values = {
            "urls": (DEFAULT_URL,) if given is None else given,
            "heartbeat": heartbeat,
            "connect_timeout": connect_timeout,
            "grace_period": grace_period,
            "consumer_timeout": consumer_timeout,
            "reconnect_delay": reconnect_delay,
            "reconnect_delay_max": reconnect_delay_max,
            "loop_lag_threshold": loop_lag_threshold,
            "name": name,
            "state_dir": state_dir,
            "metrics_port": metrics_port,
            "metrics_host": metrics_host,
            "alerts": alerts,
            "idempotency": idempotency,
            "idempotency_store": idempotency_store,
            "idempotency_retention": idempotency_retention,
            "lease": lease,
        }
        for key, value in values.items():
            object.__setattr__(self, key, value)
        self.__post_init__()

    @property
    def url(self) -> tuple[str, ...]:
        """The broker URLs: the same tuple as :attr:`urls`."""
        return self.urls

    def __repr__(self) -> str:
        # The generated repr would show the broker URLs with their passwords.
        shown = ", ".join(
            f"{item.name}={getattr(self, item.name)!r}"
            for item in fields(self)
            if item.repr and item.name != "urls"
        )
        urls = tuple(mask_url(url) for url in self.urls)
        return f"Settings(urls={urls!r}, {shown})"

    def __post_init__(self) -> None:
        given: object = self.urls
        if isinstance(given, str):
            urls: tuple[str, ...] = (given,)
        elif isinstance(given, Sequence) and all(isinstance(url, str) for url in given):
            urls = tuple(given)
        else:
            raise ConfigurationError("the broker URLs must be a string or a sequence of strings")
        if not urls:
            raise ConfigurationError("no broker URL given")
        object.__setattr__(self, "urls", urls)
        object.__setattr__(self, "addresses", tuple(parse_url(url) for url in urls))
        if isinstance(self.state_dir, str):
            object.__setattr__(self, "state_dir", Path(self.state_dir))
        _require(
            self.state_dir is None or isinstance(self.state_dir, Path),
            "state_dir must be a path",
        )
        _require(0 <= self.heartbeat <= 65535, "heartbeat must be between 0 and 65535 seconds")
        _require(self.connect_timeout > 0, "connect_timeout must be > 0 seconds")
        _require(self.grace_period >= 0, "grace_period must be >= 0 seconds")
        _require(self.consumer_timeout > 0, "consumer_timeout must be > 0 seconds")
        _require(
            0 < self.reconnect_delay <= self.reconnect_delay_max,
            "need 0 < reconnect_delay <= reconnect_delay_max",
        )
        _require(self.loop_lag_threshold > 0, "loop_lag_threshold must be > 0 seconds")
        _require(
            self.metrics_port is None or 0 <= self.metrics_port <= 65535,
            "metrics_port must be between 0 and 65535",
        )
        _require(bool(self.metrics_host), "metrics_host must not be empty")
        _require(isinstance(self.idempotency, bool), "idempotency must be True or False")
        _require(self.idempotency_retention > 0, "idempotency_retention must be > 0 seconds")
        _require(0 < self.lease <= 86400, "lease must be between 0 and 86400 seconds")
        store = self.idempotency_store
        _require(
            store is None or store.startswith(_STORE_SCHEMES),
            f"idempotency_store must be a postgresql://, postgres:// or redis:// URL, not "
            f"{mask_url(str(store))!r}",
        )


_STORE_SCHEMES = ("postgresql://", "postgres://", "redis://", "rediss://")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigurationError(message)
