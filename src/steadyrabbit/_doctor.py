"""``steadyrabbit doctor``: check a broker, its queues and a worker's settings before trouble.

:func:`diagnose` connects with the settings a worker would use and returns a
:class:`DoctorReport`: what it saw (server, heartbeat, queues, consumers, alarms) and a list of
:class:`Finding` s, each with a level (ok, info, warning, critical), a title, a detail and a
one-line fix. It names the failure modes this project exists for when their conditions are
present: a prefetched message that waits past ``consumer_timeout`` (PRECONDITION_FAILED, channel
closed, everything redelivered), heartbeats turned off, queues without a dead-letter route,
alarms and blocked connections, and ``x-consumer-timeout`` on a broker that ignores it.

AMQP alone gives the server's version and capabilities, the negotiated heartbeat, and each
queue's ready count and consumer count (passive declarations, which change nothing). The
management HTTP API, when reachable, adds queue types and arguments, unacked counts, the live
consumers' prefetch and ack mode, retry queues, alarms and blocked connections. Whatever could
not be checked is listed in the report. Secrets never enter the report: URLs are masked.

The broker's ``consumer_timeout`` is not exposed over HTTP by RabbitMQ 3.10 (neither
``/api/overview`` nor ``/api/nodes`` carries it), so the configured ``--consumer-timeout`` is
used and the report says so.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from urllib.parse import quote

import httpx

from ._amqp import ACCESS_REFUSED, NOT_FOUND, AmqpChannel, AmqpConnection, first_connection
from ._errors import (
    ChannelClosedError,
    ConfigurationError,
)
from ._settings import Settings
from ._url import BrokerAddress, mask_url

__all__ = [
    "ConsumerReport",
    "DoctorReport",
    "Finding",
    "QueueReport",
    "can_encode",
    "diagnose",
    "format_report",
]

Level = Literal["ok", "info", "warning", "critical"]
LEVELS: tuple[Level, ...] = ("ok", "info", "warning", "critical")

# Broker facts (see DESIGN.md): 5-20 s is the recommended heartbeat; a peer is declared dead
# after two missed intervals; x-consumer-timeout is honoured from RabbitMQ 3.12 on.
HEARTBEAT_MIN = 5
HEARTBEAT_MAX = 20
CONSUMER_TIMEOUT_ARGUMENT_SINCE = (3, 12)
DEFAULT_MANAGEMENT_PORTS = {"amqp": ("http", 15672), "amqps": ("https", 15671)}
_MANAGEMENT_TIMEOUT_MAX = 10.0
_SHOWN_NAMES = 3
_STEADYRABBIT_PRODUCT = "steadyrabbit"
_TIMES = "\N{MULTIPLICATION SIGN}"

_NO_HEARTBEAT_DETECTION = (
    "a dead broker or a silently dropped connection (NAT or firewall idle timeout, a VM "
    "paused or moved) is noticed only when TCP gives up on unacknowledged data, about 15 "
    "minutes with Linux defaults, and by an idle consumer, which sends nothing, not at all"
)
_SEED1_FAILURE = (
    "the broker closes the channel with PRECONDITION_FAILED (delivery acknowledgement timed "
    "out) and redelivers everything unacked on it; the late acks then fail on the dead channel "
    "(ChannelWrongStateError, or StreamLostError when the connection went too), and the backlog "
    "is pushed into the consumer again"
)


# -- the report --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One line of the checklist. ``fix`` is one sentence, empty when there is nothing to do."""

    level: Level
    check: str
    title: str
    detail: str = ""
    fix: str = ""
    queue: str | None = None


@dataclass(frozen=True)
class ConsumerReport:
    """A live consumer of a queue, as the management API shows it.

    ``prefetch``: the consumer's own limit (0 = none); ``channel_prefetch``: the channel-wide
    limit (``basic.qos`` with ``global``), 0 = none, None = unknown. ``heartbeat`` is its
    connection's negotiated heartbeat (None = unknown); ``client`` its client library.
    """

    tag: str
    connection: str
    client: str | None
    prefetch: int
    channel_prefetch: int | None
    ack_required: bool
    heartbeat: int | None
    arguments: dict[str, Any]

    @property
    def effective_prefetch(self) -> int:
        """Messages it may hold unacked; 0 = unlimited."""
        if self.prefetch > 0:
            return self.prefetch
        return self.channel_prefetch or 0

    @property
    def is_steadyrabbit(self) -> bool:
        return self.client == _STEADYRABBIT_PRODUCT


@dataclass(frozen=True)
class RetryQueueReport:
    name: str
    messages: int | None


@dataclass(frozen=True)
class QueueReport:
    """What doctor learned about one queue. None means "not known" (no management API)."""

    name: str
    exists: bool
    messages_ready: int | None = None
    consumer_count: int | None = None
    type: str | None = None
    durable: bool | None = None
    arguments: dict[str, Any] | None = None
    policy: str | None = None
    effective_policy: dict[str, Any] | None = None
    messages_unacknowledged: int | None = None
    ack_rate: float | None = None
    redeliver_rate: float | None = None
    consumers: tuple[ConsumerReport, ...] | None = None
    dead_letter_queue: str = ""
    dead_letter_queue_exists: bool | None = None
    dead_letter_messages: int | None = None
    dead_letter_exchange: str | None = None
    retry_queues: tuple[RetryQueueReport, ...] | None = None
    consumer_timeout: float | None = None
    consumer_timeout_source: str | None = None


@dataclass(frozen=True)
class ServerReport:
    product: str | None
    version: str | None
    platform: str | None
    cluster_name: str | None
    capabilities: dict[str, bool]


@dataclass(frozen=True)
class ManagementReport:
    """``url`` is masked; ``status`` says why it was not available."""

    url: str
    available: bool
    status: str


@dataclass(frozen=True)
class DoctorReport:
    broker: str
    server: ServerReport
    heartbeat_requested: int
    heartbeat_negotiated: int
    management: ManagementReport
    consumer_timeout: float
    consumer_timeout_source: str
    prefetch: int
    concurrency: int
    handler_seconds: float | None
    queues: tuple[QueueReport, ...]
    alarms: tuple[str, ...] | None
    blocked_connections: tuple[str, ...] | None
    blocking_connections: tuple[str, ...] | None
    not_checked: tuple[str, ...]
    findings: tuple[Finding, ...]
    unreachable: tuple[str, ...] = field(default=())

    def count(self, level: Level) -> int:
        return sum(1 for finding in self.findings if finding.level == level)

    @property
    def critical(self) -> bool:
        return self.count("critical") > 0

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["summary"] = {level: self.count(level) for level in LEVELS}
        document["critical"] = self.critical
        return document


# -- the management API ------------------------------------------------------------------------


class _ManagementUnavailable(Exception):
    """The management API cannot be used at all (unreachable, refused, not the API)."""


class _ManagementDenied(Exception):
    """This user may not read this endpoint (needs another tag)."""


@dataclass(frozen=True)
class ManagementTarget:
    """Where the management API is, and as whom; ``display`` is masked."""

    base_url: str
    username: str
    password: str = field(repr=False)

    @property
    def display(self) -> str:
        scheme, _, rest = self.base_url.partition("://")
        return f"{scheme}://{quote(self.username, safe='')}:****@{rest}"


def management_target(address: BrokerAddress, url: str | None) -> ManagementTarget:
    """The management API for ``address``: ``url`` if given, else its host on port 15672
    (15671 for amqps), with the broker URL's credentials unless ``url`` carries its own."""
    if url is None:
        scheme, port = DEFAULT_MANAGEMENT_PORTS[address.scheme]
        host = f"[{address.host}]" if ":" in address.host else address.host
        return ManagementTarget(f"{scheme}://{host}:{port}", address.username, address.password)
    shown = mask_url(url)
    try:
        parsed = httpx.URL(url.strip())
        host = parsed.host
    except (httpx.InvalidURL, ValueError):
        raise ConfigurationError(f"malformed --management-url {shown!r}") from None
    if parsed.scheme not in ("http", "https") or not host:
        raise ConfigurationError(
            f"malformed --management-url {shown!r}: it must be http:// or https:// and name a host"
        )
    username = parsed.username or address.username
    password = parsed.password or (address.password if not parsed.username else "")
    netloc = f"[{host}]" if ":" in host else host
    if parsed.port is not None:
        netloc += f":{parsed.port}"
    path = parsed.path.rstrip("/")
    return ManagementTarget(f"{parsed.scheme}://{netloc}{path}", username, password)


class _Management:
    def __init__(self, client: httpx.AsyncClient, target: ManagementTarget) -> None:
        self._client = client
        self._target = target

    async def get(self, path: str, **params: str | int) -> Any:
        """The JSON at ``/api/<path>``; None for 404."""
        url = f"{self._target.base_url}/api/{path}"
        try:
            response = await self._client.get(url, params=params or None)
        except httpx.TimeoutException:
            raise _ManagementUnavailable("it did not answer in time") from None
        except httpx.HTTPError as exc:
            raise _ManagementUnavailable(_http_error(exc)) from None
        if response.status_code == 401:
            raise _ManagementUnavailable(
                f"it refused the login of user {self._target.username!r} (the user needs the "
                "management or monitoring tag, or give --management-url with other credentials)"
            )
        if response.status_code == 403:
            raise _ManagementDenied(f"/api/{path.split('/')[0]}: access refused")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise _ManagementUnavailable(f"it answered HTTP {response.status_code}")
        try:
            return response.json()
        except ValueError:
            raise _ManagementUnavailable("it did not answer with JSON") from None


def _http_error(exc: httpx.HTTPError) -> str:
    cause: BaseException = exc
    while cause.__cause__ is not None or cause.__context__ is not None:
        nxt = cause.__cause__ or cause.__context__
        assert nxt is not None
        cause = nxt
    text = str(cause) or type(cause).__name__
    if isinstance(cause, ConnectionRefusedError) or "refused" in text.lower():
        return "connection refused"
    return mask_url(text)


def _quote(name: str) -> str:
    return quote(name, safe="")


# -- connecting --------------------------------------------------------------------------------


def _connection(
    settings: Settings, name: str, unreachable: list[str]
) -> AbstractAsyncContextManager[AmqpConnection]:
    """The first configured broker that answers, as a worker would connect; closed after."""
    return first_connection(
        settings.addresses,
        heartbeat=settings.heartbeat,
        connect_timeout=settings.connect_timeout,
        name=name,
        unreachable=unreachable,
    )


class _Channels:
    """A channel for passive declarations; a missing object closes it, so reopen on demand."""

    def __init__(self, connection: AmqpConnection) -> None:
        self._connection = connection
        self._channel: AmqpChannel | None = None

    async def _get(self) -> AmqpChannel:
        if self._channel is None or not self._channel.is_open:
            self._channel = await self._connection.channel()
        return self._channel

    async def queue(self, name: str) -> tuple[int, int] | None:
        """(ready, consumers) of an existing queue; None if it does not exist."""
        channel = await self._get()
        try:
            return await channel.declare_queue(name, passive=True)
        except ChannelClosedError as exc:
            self._channel = None
            if exc.reply_code == NOT_FOUND:
                return None
            raise

    async def exchange_exists(self, name: str) -> bool:
        if name == "":
            return True  # the default exchange always exists
        channel = await self._get()
        try:
            await channel.declare_exchange(name, "direct", passive=True)
        except ChannelClosedError as exc:
            self._channel = None
            if exc.reply_code == NOT_FOUND:
                return False
            raise
        return True

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()


# -- gathering ---------------------------------------------------------------------------------


def _version(text: str | None) -> tuple[int, ...] | None:
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    if match is None:
        return None
    return tuple(int(part) for part in match.groups() if part is not None)


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _server(properties: dict[str, Any]) -> ServerReport:
    capabilities = properties.get("capabilities") or {}
    return ServerReport(
        product=_text(properties.get("product")),
        version=_text(properties.get("version")),
        platform=_text(properties.get("platform")),
        cluster_name=_text(properties.get("cluster_name")),
        capabilities={_text(k) or "": bool(v) for k, v in dict(capabilities).items()},
    )


def _rate(stats: Any, key: str) -> float | None:
    if not isinstance(stats, dict):
        return None
    details = stats.get(f"{key}_details")
    if isinstance(details, dict) and isinstance(details.get("rate"), int | float):
        return float(details["rate"])
    return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class _Gatherer:
    """Collects the facts; findings are derived from them afterwards."""

    def __init__(
        self,
        channels: _Channels,
        management: _Management | None,
        vhost: str,
        version: tuple[int, ...] | None,
        consumer_timeout: float,
    ) -> None:
        self.channels = channels
        self.management = management
        self.vhost = _quote(vhost)
        self.version = version
        self.consumer_timeout = consumer_timeout
        self.not_checked: list[str] = []
        self.denied: list[str] = []
        self._channel_limits: dict[str, int] | None = None
        self._connections: dict[str, dict[str, Any]] | None = None

    def _management_lost(self, exc: _ManagementUnavailable) -> None:
        self.management = None
        self.not_checked.append(f"the management API stopped answering: {exc}")

    async def _api(self, path: str, **params: str | int) -> Any:
        """GET through the management API; None when unavailable, denied or not found."""
        if self.management is None:
            return None
        try:
            return await self.management.get(path, **params)
        except _ManagementDenied as exc:
            self.denied.append(str(exc))
        except _ManagementUnavailable as exc:
            self._management_lost(exc)
        return None

    async def _vhost_channel_limits(self) -> dict[str, int]:
        if self._channel_limits is None:
            listing = await self._api(
                f"vhosts/{self.vhost}/channels", columns="name,global_prefetch_count"
            )
            self._channel_limits = {
                str(item.get("name")): _int(item.get("global_prefetch_count")) or 0
                for item in listing or []
                if isinstance(item, dict)
            }
        return self._channel_limits

    async def _vhost_connections(self) -> dict[str, dict[str, Any]]:
        if self._connections is None:
            listing = await self._api(
                f"vhosts/{self.vhost}/connections",
                columns="name,timeout,client_properties,user_provided_name",
            )
            self._connections = {
                str(item.get("name")): item for item in listing or [] if isinstance(item, dict)
            }
        return self._connections

    async def _consumers(self, details: list[Any]) -> tuple[ConsumerReport, ...]:
        consumers: list[ConsumerReport] = []
        for item in details:
            if not isinstance(item, dict):
                continue
            channel = item.get("channel_details") or {}
            connection_name = str(channel.get("connection_name") or "?")
            prefetch = _int(item.get("prefetch_count")) or 0
            channel_prefetch: int | None = None
            if prefetch == 0:
                limits = await self._vhost_channel_limits()
                channel_prefetch = limits.get(str(channel.get("name")))
            connection = (await self._vhost_connections()).get(connection_name, {})
            client_properties = connection.get("client_properties") or {}
            shown = connection.get("user_provided_name") or connection_name
            consumers.append(
                ConsumerReport(
                    tag=str(item.get("consumer_tag") or "?"),
                    connection=str(shown),
                    client=_text(client_properties.get("product")),
                    prefetch=prefetch,
                    channel_prefetch=channel_prefetch,
                    ack_required=bool(item.get("ack_required", True)),
                    heartbeat=_int(connection.get("timeout")),
                    arguments=dict(item.get("arguments") or {}),
                )
            )
        return tuple(consumers)

    def _queue_timeout(
        self, arguments: dict[str, Any] | None, policy: dict[str, Any] | None
    ) -> tuple[float, str]:
        """The consumer_timeout that applies to a queue, and where it comes from."""
        honoured = self.version is not None and self.version >= CONSUMER_TIMEOUT_ARGUMENT_SINCE
        candidates: list[tuple[float, str]] = []
        if honoured:
            argument = (arguments or {}).get("x-consumer-timeout")
            if isinstance(argument, int | float) and argument > 0:
                candidates.append((argument / 1000, "queue argument x-consumer-timeout"))
            from_policy = (policy or {}).get("consumer-timeout")
            if isinstance(from_policy, int | float) and from_policy > 0:
                candidates.append((from_policy / 1000, "policy consumer-timeout"))
        if candidates:
            return min(candidates)
        return self.consumer_timeout, "global"

    async def queue(self, name: str) -> QueueReport:
        dlq = f"{name}.dlq"
        try:
            counts = await self.channels.queue(name)
        except ChannelClosedError as exc:
            if exc.reply_code == ACCESS_REFUSED:
                self.not_checked.append(f"queue {name!r}: access refused ({exc.reply_text})")
                return QueueReport(name=name, exists=False, dead_letter_queue=dlq)
            raise
        if counts is None:
            return QueueReport(name=name, exists=False, dead_letter_queue=dlq)
        ready, consumer_count = counts
        dlq_counts = await self.channels.queue(dlq)
        report = QueueReport(
            name=name,
            exists=True,
            messages_ready=ready,
            consumer_count=consumer_count,
            dead_letter_queue=dlq,
            dead_letter_queue_exists=dlq_counts is not None,
            dead_letter_messages=dlq_counts[0] if dlq_counts is not None else None,
            consumer_timeout=self.consumer_timeout,
            consumer_timeout_source="global",
        )
        if self.management is None:
            return report
        data = await self._api(f"queues/{self.vhost}/{_quote(name)}")
        if not isinstance(data, dict):
            if self.management is not None:
                self.not_checked.append(
                    f"queue {name!r}: the management API has no statistics for it yet "
                    "(a new queue?); run doctor again in a few seconds"
                )
            return report
        arguments = dict(data.get("arguments") or {})
        policy = data.get("effective_policy_definition")
        policy = dict(policy) if isinstance(policy, dict) else {}
        dlx = arguments.get("x-dead-letter-exchange", policy.get("dead-letter-exchange"))
        retry = await self._api(
            f"queues/{self.vhost}",
            page=1,
            page_size=500,
            name=f"^{re.escape(name)}\\.retry\\.[0-9]+ms$",
            use_regex="true",
            columns="name,messages",
        )
        retry_queues = None
        if isinstance(retry, dict):
            retry_queues = tuple(
                RetryQueueReport(str(item.get("name")), _int(item.get("messages")))
                for item in retry.get("items") or []
                if isinstance(item, dict)
            )
        timeout, source = self._queue_timeout(arguments, policy)
        stats = data.get("message_stats")
        return QueueReport(
            name=name,
            exists=True,
            messages_ready=ready,
            consumer_count=consumer_count,
            type=_text(data.get("type")),
            durable=bool(data.get("durable")),
            arguments=arguments,
            policy=_text(data.get("policy")),
            effective_policy=policy,
            messages_unacknowledged=_int(data.get("messages_unacknowledged")),
            ack_rate=_rate(stats, "ack"),
            redeliver_rate=_rate(stats, "redeliver"),
            consumers=await self._consumers(list(data.get("consumer_details") or [])),
            dead_letter_queue=dlq,
            dead_letter_queue_exists=report.dead_letter_queue_exists,
            dead_letter_messages=report.dead_letter_messages,
            dead_letter_exchange=_text(dlx),
            retry_queues=retry_queues,
            consumer_timeout=timeout,
            consumer_timeout_source=source,
        )

    async def alarms(self) -> tuple[str, ...] | None:
        nodes = await self._api("nodes", columns="name,mem_alarm,disk_free_alarm")
        if not isinstance(nodes, list):
            return None
        alarms: list[str] = []
        for node in nodes:
            if not isinstance(node, dict):
                continue
            if node.get("mem_alarm"):
                alarms.append(f"memory alarm on {node.get('name')}")
            if node.get("disk_free_alarm"):
                alarms.append(f"disk alarm on {node.get('name')}")
        return tuple(alarms)

    async def blocked(self, own_name: str) -> dict[str, tuple[str, ...]] | None:
        """Names of the connections in state "blocked" (not read by the broker) and "blocking"
        (will be as soon as they publish), doctor's own left out."""
        connections = await self._api("connections", columns="name,state,user_provided_name")
        if not isinstance(connections, list):
            return None
        states: dict[str, list[str]] = {"blocked": [], "blocking": []}
        for item in connections:
            if not isinstance(item, dict) or item.get("user_provided_name") == own_name:
                continue
            state = item.get("state")
            if state in states:
                states[state].append(str(item.get("user_provided_name") or item.get("name")))
        return {state: tuple(names) for state, names in states.items()}


# -- findings ----------------------------------------------------------------------------------


def _seconds(value: float) -> str:
    if value >= 120 and value % 60 == 0:
        return f"{value / 60:g} min"
    return f"{value:g} s"


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOWN_NAMES])
    if len(names) > _SHOWN_NAMES:
        shown += f" and {len(names) - _SHOWN_NAMES} more"
    return shown


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _heartbeat_findings(requested: int, negotiated: int) -> list[Finding]:
    asked = "" if requested == negotiated else f" (requested {requested} s)"
    if negotiated == 0:
        return [
            Finding(
                "warning",
                "heartbeat",
                f"heartbeats are off (negotiated 0{asked}): a dead peer goes unnoticed for minutes",
                f"With heartbeats off, {_NO_HEARTBEAT_DETECTION}. Meanwhile the broker keeps "
                "this consumer's unacked messages. Turning heartbeats off is the usual "
                "workaround for 'Too many heartbeats missed', whose cause is a client that "
                "stops serving its connection while a handler runs; steadyrabbit keeps "
                "heartbeats on its event loop whatever the handlers do.",
                f"use --heartbeat 15 (between {HEARTBEAT_MIN} and {HEARTBEAT_MAX} s), and no "
                "heartbeat=0 in the broker URL",
            )
        ]
    detection = f"a dead peer is noticed after about {_seconds(2 * negotiated)}"
    if negotiated < HEARTBEAT_MIN:
        return [
            Finding(
                "warning",
                "heartbeat",
                f"heartbeat {negotiated} s{asked} is below {HEARTBEAT_MIN} s: false alarms",
                f"{detection.capitalize()}, but a busy machine or a long garbage collection "
                "pause misses two beats that quickly, and the connection is dropped for "
                "nothing (every unacked message redelivered).",
                f"use --heartbeat between {HEARTBEAT_MIN} and {HEARTBEAT_MAX} s (15 is the "
                "default)",
            )
        ]
    if negotiated > HEARTBEAT_MAX:
        return [
            Finding(
                "info",
                "heartbeat",
                f"heartbeat {negotiated} s{asked}: {detection}",
                f"{HEARTBEAT_MIN}-{HEARTBEAT_MAX} s is the recommended range; a longer interval "
                "only delays noticing a dead connection.",
                "use --heartbeat 15 to notice a dead connection sooner",
            )
        ]
    return [Finding("ok", "heartbeat", f"heartbeat {negotiated} s{asked}: {detection}")]


def _handler_findings(handler: float | None, timeout: float, queue: str | None) -> list[Finding]:
    """A handler's own duration against ``timeout``: a delivery is unacked at least that long."""
    if handler is None:
        return []
    where = f" on queue {queue}" if queue else ""
    if handler >= timeout:
        return [
            Finding(
                "critical",
                "handler-timeout",
                f"handler duration {_seconds(handler)} ≥ consumer_timeout "
                f"{_seconds(timeout)}{where}: every delivery times out",
                f"Each message is still unacked when the consumer_timeout expires: "
                f"{_SEED1_FAILURE}. Then it runs again, forever.",
                "make the broker's consumer_timeout longer than the slowest handler "
                "(consumer_timeout in rabbitmq.conf, in ms), or make the handler shorter",
                queue,
            )
        ]
    if handler * 2 >= timeout:
        return [
            Finding(
                "warning",
                "handler-timeout",
                f"handler duration {_seconds(handler)} is at least half the "
                f"consumer_timeout {_seconds(timeout)}{where}",
                "A slower day for whatever the handler calls puts deliveries past the "
                f"timeout: {_SEED1_FAILURE}.",
                "give the broker a consumer_timeout well above the slowest handler",
                queue,
            )
        ]
    return []


def _configured_findings(
    prefetch: int, concurrency: int, handler: float | None, timeout: float
) -> list[Finding]:
    """The worker about to run with these settings, against ``timeout``."""
    findings = _handler_findings(handler, timeout, None)
    if prefetch == 0:
        findings.append(_unlimited_prefetch_finding(concurrency, handler, timeout))
    elif prefetch == concurrency:
        findings.append(
            Finding(
                "ok",
                "prefetch",
                f"prefetch {prefetch} = concurrency {concurrency}: no message waits unstarted "
                "in the worker",
            )
        )
    elif prefetch < concurrency:
        findings.append(
            Finding(
                "info",
                "prefetch",
                f"prefetch {prefetch} < concurrency {concurrency}: at most {prefetch} handlers "
                "ever run at once",
                fix="leave --prefetch unset (it defaults to the concurrency)",
            )
        )
    else:
        waves = math.ceil(prefetch / concurrency)
        if handler is None:
            findings.append(
                Finding(
                    "info",
                    "prefetch",
                    f"prefetch {prefetch} > concurrency {concurrency}: up to "
                    f"{prefetch - concurrency} messages wait unstarted in the worker",
                    "Give --handler-seconds to check how long they wait against the "
                    "consumer_timeout.",
                    "leave --prefetch unset (prefetch = concurrency)",
                )
            )
        elif waves * handler >= timeout / 2:
            worst = waves * handler
            findings.append(
                Finding(
                    "warning",
                    "prefetch-timeout",
                    f"prefetch {prefetch} with concurrency {concurrency} and handlers of "
                    f"{_seconds(handler)}: the last prefetched message is acked only after "
                    f"~{_seconds(worst)}, past half the consumer_timeout {_seconds(timeout)}",
                    "steadyrabbit returns a message that waited half the consumer_timeout "
                    "unstarted to the queue, so the broker does not close the channel, but "
                    "those messages go round and round (requeued, delivered, aged again). "
                    "Any consumer without that safety net would hit the timeout: "
                    f"{_SEED1_FAILURE}.",
                    "leave --prefetch unset (prefetch = concurrency)",
                )
            )
        else:
            findings.append(
                Finding(
                    "info",
                    "prefetch",
                    f"prefetch {prefetch} > concurrency {concurrency}: a prefetched message "
                    f"waits up to ~{_seconds((waves - 1) * handler)} unstarted, within the "
                    f"consumer_timeout {_seconds(timeout)}",
                )
            )
    return findings


def _unlimited_prefetch_finding(concurrency: int, handler: float | None, timeout: float) -> Finding:
    """--prefetch 0: seed 1's own setting, described (a steadyrabbit worker refuses it)."""
    fix = (
        "set the consumer's prefetch to its concurrency (a steadyrabbit worker does so when "
        "--prefetch is unset, and never runs with 0)"
    )
    if handler is None:
        return Finding(
            "warning",
            "prefetch-timeout",
            "prefetch 0 (unlimited): the broker pushes the whole backlog into the consumer",
            f"Once backlog {_TIMES} handler duration reaches the consumer_timeout of "
            f"{_seconds(timeout)}, {_SEED1_FAILURE}. Give --handler-seconds to know how "
            "large a backlog that takes.",
            fix,
        )
    backlog = max(1, math.floor(timeout / handler) * concurrency)
    return Finding(
        "critical",
        "prefetch-timeout",
        f"prefetch 0 (unlimited) with handlers of {_seconds(handler)}: a backlog above "
        f"{_plural(backlog, 'message')} times out",
        f"The broker pushes the whole backlog into the consumer. With handlers of "
        f"{_seconds(handler)}, {concurrency} at a time, any backlog above {backlog} messages "
        f"leaves a prefetched message waiting past the consumer_timeout of "
        f"{_seconds(timeout)}: {_SEED1_FAILURE}.",
        fix,
    )


def _consumer_line(consumer: ConsumerReport) -> str:
    client = f", {consumer.client}" if consumer.client else ""
    return f"{consumer.tag} ({consumer.connection}{client})"


def _live_consumer_findings(
    queue: QueueReport, concurrency: int, handler: float | None
) -> list[Finding]:
    if queue.consumers is None or queue.consumer_timeout is None:
        return []
    timeout = queue.consumer_timeout
    name = queue.name
    findings: list[Finding] = []
    unlimited: list[str] = []
    too_deep: list[tuple[str, int, float]] = []
    auto_ack: list[str] = []
    no_heartbeat: list[str] = []
    for consumer in queue.consumers:
        if consumer.heartbeat == 0:
            no_heartbeat.append(_consumer_line(consumer))
        if not consumer.ack_required:
            auto_ack.append(_consumer_line(consumer))
            continue
        if consumer.is_steadyrabbit:
            continue  # returns aged prefetched messages itself (invariant 2)
        limit = consumer.effective_prefetch
        if limit == 0:
            unlimited.append(_consumer_line(consumer))
        elif handler is not None:
            parallel = min(limit, concurrency)
            worst = math.ceil(limit / parallel) * handler
            if worst >= timeout:
                too_deep.append((_consumer_line(consumer), limit, worst))
    fix = (
        f"set prefetch = concurrency on those consumers (basic_qos(prefetch_count="
        f"{concurrency})), or consume {name} with steadyrabbit"
    )
    if unlimited:
        count = _plural(len(unlimited), "consumer")
        if handler is not None:
            backlog = max(1, math.floor(timeout / handler) * concurrency)
            findings.append(
                Finding(
                    "critical",
                    "prefetch-timeout",
                    f"queue {name}: {count} with unlimited prefetch: prefetch {_TIMES} handler "
                    f"duration ≥ consumer_timeout",
                    f"{_names(unlimited)}: with prefetch 0 the broker pushes the whole backlog "
                    f"into the consumer. With handlers of {_seconds(handler)}, "
                    f"{concurrency} at a time, any backlog above {backlog} messages leaves a "
                    f"prefetched message waiting past the consumer_timeout of "
                    f"{_seconds(timeout)}: {_SEED1_FAILURE}.",
                    fix,
                    name,
                )
            )
        else:
            findings.append(
                Finding(
                    "warning",
                    "prefetch-timeout",
                    f"queue {name}: {count} with unlimited prefetch",
                    f"{_names(unlimited)}: with prefetch 0 the broker pushes the whole backlog "
                    f"into the consumer; once backlog {_TIMES} handler duration reaches the "
                    f"consumer_timeout of {_seconds(timeout)}, {_SEED1_FAILURE}. Give "
                    "--handler-seconds to know how close it is.",
                    fix,
                    name,
                )
            )
    for line, limit, worst in too_deep:
        findings.append(
            Finding(
                "critical",
                "prefetch-timeout",
                f"queue {name}: consumer prefetch {limit} {_TIMES} handler duration ≥ "
                "consumer_timeout",
                f"{line}: assuming it runs {_plural(min(limit, concurrency), 'handler')} of "
                f"{_seconds(handler or 0)} at a time, its last prefetched message is acked "
                f"after ~{_seconds(worst)}, past the consumer_timeout of {_seconds(timeout)}: "
                f"{_SEED1_FAILURE}.",
                fix,
                name,
            )
        )
    if no_heartbeat:
        findings.append(
            Finding(
                "warning",
                "consumer-heartbeat",
                f"queue {name}: {_plural(len(no_heartbeat), 'consumer')} with heartbeats off",
                f"{_names(no_heartbeat)}: {_NO_HEARTBEAT_DETECTION}.",
                f"give those clients a heartbeat of {HEARTBEAT_MIN}-{HEARTBEAT_MAX} s",
                name,
            )
        )
    if auto_ack:
        findings.append(
            Finding(
                "info",
                "auto-ack",
                f"queue {name}: {_plural(len(auto_ack), 'consumer')} with automatic "
                "acknowledgement",
                f"{_names(auto_ack)}: whatever was pushed to them is lost if they crash, and "
                "nothing limits how much that is.",
                "consume with manual acknowledgements (steadyrabbit does)",
                name,
            )
        )
    return findings


def _queue_findings(
    queue: QueueReport,
    version: tuple[int, ...] | None,
    concurrency: int,
    handler: float | None,
    global_timeout: float,
    dlx_exists: bool | None,
) -> list[Finding]:
    name = queue.name
    if not queue.exists:
        return [
            Finding(
                "info",
                "queue",
                f"queue {name} does not exist (or may not be read)",
                "A steadyrabbit worker declares it durable, with no arguments, and its "
                f"{name}.dlq.",
                queue=name,
            )
        ]
    findings: list[Finding] = []
    consumers = queue.consumer_count or 0
    summary = f"{_plural(queue.messages_ready or 0, 'message')} ready"
    if queue.messages_unacknowledged is not None:
        summary += f", {queue.messages_unacknowledged} unacked"
    summary += f", {_plural(consumers, 'consumer')}"
    kind = f" ({queue.type})" if queue.type else ""
    findings.append(Finding("ok", "queue", f"queue {name}{kind}: {summary}", queue=name))

    # Dead-letter route.
    if queue.dead_letter_queue_exists:
        waiting = queue.dead_letter_messages or 0
        findings.append(
            Finding(
                "info" if waiting else "ok",
                "dead-letter",
                f"queue {name}: failures go to {queue.dead_letter_queue}"
                + (f", which holds {_plural(waiting, 'message')}" if waiting else ""),
                fix=f"steadyrabbit dlq list {name}" if waiting else "",
                queue=name,
            )
        )
    elif queue.dead_letter_exchange is not None:
        shown = queue.dead_letter_exchange or "(the default exchange)"
        if dlx_exists is False:
            findings.append(
                Finding(
                    "warning",
                    "dead-letter",
                    f"queue {name}: its dead-letter exchange {shown} does not exist",
                    "Messages dead-lettered to a missing exchange are dropped.",
                    f"declare the exchange {shown} and bind a queue to it",
                    name,
                )
            )
        else:
            findings.append(
                Finding(
                    "ok",
                    "dead-letter",
                    f"queue {name}: dead-letters to exchange {shown}",
                    queue=name,
                )
            )
    else:
        unknown = queue.arguments is None
        findings.append(
            Finding(
                "warning",
                "dead-letter",
                f"queue {name}: no dead-letter route (no {queue.dead_letter_queue}"
                + (")" if unknown else ", no x-dead-letter-exchange)"),
                "A message its consumer cannot process either loops (nack with requeue, "
                "redelivered at once, again and again) or is lost (nack without requeue)."
                + (
                    " Without the management API the queue's arguments (a dead-letter "
                    "exchange) could not be seen."
                    if unknown
                    else ""
                ),
                f"consume it with steadyrabbit (which declares {queue.dead_letter_queue}), or "
                "give it a dead-letter exchange (x-dead-letter-exchange or a policy)",
                name,
            )
        )
    if queue.retry_queues:
        listing = ", ".join(
            f"{retry.name} ({retry.messages if retry.messages is not None else '?'})"
            for retry in queue.retry_queues
        )
        findings.append(Finding("ok", "retry", f"queue {name}: retry queues {listing}", queue=name))

    # x-consumer-timeout before 3.12 (queue argument, policy or consumer argument).
    ignored = version is not None and version < CONSUMER_TIMEOUT_ARGUMENT_SINCE
    if ignored:
        places: list[str] = []
        arguments = queue.arguments or {}
        policy = queue.effective_policy or {}
        if "x-consumer-timeout" in arguments:
            places.append(f"queue argument x-consumer-timeout = {arguments['x-consumer-timeout']}")
        if "consumer-timeout" in policy:
            places.append(f"policy {queue.policy} consumer-timeout = {policy['consumer-timeout']}")
        with_argument = [
            _consumer_line(c) for c in queue.consumers or () if "x-consumer-timeout" in c.arguments
        ]
        if with_argument:
            places.append(f"consumer argument x-consumer-timeout on {_names(with_argument)}")
        if places:
            findings.append(
                Finding(
                    "warning",
                    "consumer-timeout-argument",
                    f"queue {name}: x-consumer-timeout is ignored by this broker (before "
                    "RabbitMQ 3.12)",
                    f"{'; '.join(places)}: accepted and silently ignored; the global "
                    f"consumer_timeout ({_seconds(global_timeout)} configured here) applies.",
                    "set consumer_timeout in rabbitmq.conf (global), or upgrade to 3.12+",
                    name,
                )
            )

    # Measured: how long deliveries stay unacked (Little's law: unacked / ack rate).
    unacked = queue.messages_unacknowledged or 0
    timeout = queue.consumer_timeout or global_timeout
    if unacked and queue.ack_rate:
        held = unacked / queue.ack_rate
        if held >= timeout / 2:
            findings.append(
                Finding(
                    "critical" if held >= timeout else "warning",
                    "measured-unacked",
                    f"queue {name}: deliveries stay unacked ~{_seconds(round(held, 1))} on "
                    f"average (measured), against a consumer_timeout of {_seconds(timeout)}",
                    f"{unacked} unacked, acked at {queue.ack_rate:g}/s: each delivery waits in "
                    f"its consumer about {_seconds(round(held, 1))}. Past the timeout, "
                    f"{_SEED1_FAILURE}.",
                    "lower the consumers' prefetch to their concurrency",
                    name,
                )
            )
    if queue.redeliver_rate and consumers:
        findings.append(
            Finding(
                "info",
                "redeliveries",
                f"queue {name}: messages are being redelivered ({queue.redeliver_rate:g}/s)",
                "Redeliveries follow a channel or connection closed with messages unacked "
                "(consumer_timeout, missed heartbeats, a crash) or a nack with requeue.",
                queue=name,
            )
        )
    if queue.consumer_timeout is not None and queue.consumer_timeout != global_timeout:
        findings += _handler_findings(handler, queue.consumer_timeout, name)
    findings.extend(_live_consumer_findings(queue, concurrency, handler))
    return findings


def _alarm_findings(
    alarms: tuple[str, ...] | None,
    blocked: tuple[str, ...] | None,
    blocking: tuple[str, ...] | None,
) -> list[Finding]:
    findings: list[Finding] = []
    if alarms:
        waiting = (
            f" {_plural(len(blocking), 'more connection')} will be blocked as soon as they publish."
            if blocking
            else ""
        )
        findings.append(
            Finding(
                "critical",
                "alarms",
                f"resource alarm: {_names(alarms)}",
                "While an alarm is on, the broker stops reading every connection that "
                "publishes: publishers hang, and a client that publishes and acks on the same "
                f"connection stops acking too, until its deliveries time out.{waiting}",
                "free memory or disk on the broker (or review vm_memory_high_watermark and "
                "disk_free_limit), and publish on a connection apart from the consumers'",
            )
        )
    elif alarms is not None:
        findings.append(Finding("ok", "alarms", "no memory or disk alarm"))
    if blocked:
        findings.append(
            Finding(
                "critical",
                "blocked-connections",
                f"{_plural(len(blocked), 'connection')} blocked by the broker",
                f"{_names(blocked)}: the broker does not read them until the alarm clears; "
                "acks sent on them wait too.",
                "clear the broker's alarm, and publish on a connection apart from the consumers'",
            )
        )
    elif blocked is not None:
        findings.append(Finding("ok", "blocked-connections", "no blocked connections"))
    return findings


async def _probe(management: _Management, cluster_name: str | None) -> str:
    """Return "available", or why the management API cannot be used.

    A management API of another broker (the default URL guesses the port) is not used.
    """
    try:
        overview = await management.get("overview")
    except (_ManagementUnavailable, _ManagementDenied) as exc:
        return f"not available: {exc}"
    if not isinstance(overview, dict) or "management_version" not in overview:
        return "not available: it did not answer as the management API"
    theirs = _text(overview.get("cluster_name"))
    if cluster_name and theirs and theirs != cluster_name:
        return f"not used: it belongs to cluster {theirs!r}, not to the broker's {cluster_name!r}"
    return "available"


# -- the entry point ---------------------------------------------------------------------------


async def diagnose(
    settings: Settings,
    queues: Sequence[str] = (),
    *,
    prefetch: int | None = None,
    concurrency: int = 1,
    handler_seconds: float | None = None,
    management_url: str | None = None,
) -> DoctorReport:
    """Connect as a worker with ``settings`` would, look at the broker and ``queues``, and
    report. Raises only when no broker could be asked at all (unreachable, refused login);
    everything else, the management API included, ends up in the report."""
    if isinstance(concurrency, bool) or concurrency < 1:
        raise ConfigurationError("concurrency must be >= 1")
    if prefetch is not None and (isinstance(prefetch, bool) or prefetch < 0):
        raise ConfigurationError("prefetch must be >= 0 (0: unlimited)")
    if handler_seconds is not None and not (handler_seconds > 0 and math.isfinite(handler_seconds)):
        raise ConfigurationError("handler duration must be > 0 seconds")
    prefetch = concurrency if prefetch is None else prefetch
    # Validate a given management URL before connecting to anything.
    management_target(settings.addresses[0], management_url)

    unreachable: list[str] = []
    # A name of its own, to tell doctor's connection apart in the management API.
    name = f"{settings.name} doctor {uuid.uuid4().hex[:8]}"
    async with _connection(settings, name, unreachable) as connection:
        address = connection.address
        target = management_target(address, management_url)
        server = _server(connection.server_properties)
        version = _version(server.version)
        requested = address.heartbeat if address.heartbeat is not None else settings.heartbeat
        negotiated = connection.negotiated_heartbeat
        timeout = min(settings.connect_timeout, _MANAGEMENT_TIMEOUT_MAX)
        async with httpx.AsyncClient(
            auth=(target.username, target.password), timeout=timeout, follow_redirects=False
        ) as client:
            management: _Management | None = _Management(client, target)
            status = await _probe(_Management(client, target), server.cluster_name)
            if status != "available":
                management = None
            channels = _Channels(connection)
            gatherer = _Gatherer(
                channels, management, address.vhost, version, settings.consumer_timeout
            )
            try:
                queue_reports = [await gatherer.queue(name) for name in queues]
                dlx_exists: dict[str, bool | None] = {}
                for queue in queue_reports:
                    if queue.dead_letter_exchange and not queue.dead_letter_queue_exists:
                        dlx_exists[queue.name] = await channels.exchange_exists(
                            queue.dead_letter_exchange
                        )
                alarms = await gatherer.alarms()
                states = await gatherer.blocked(name)
            finally:
                channels.close()
            management_available = gatherer.management is not None

    not_checked: list[str] = []
    if not management_available:
        not_checked += [
            "queue types and arguments (x-dead-letter-exchange, x-consumer-timeout), "
            "unacked counts, message rates",
            "the live consumers' prefetch, ack mode and heartbeats",
            "retry queues (<queue>.retry.<ms>ms)",
            "memory and disk alarms, blocked connections",
        ]
    not_checked.append(
        "the broker's consumer_timeout: the management API does not expose it (RabbitMQ "
        "3.10); the configured --consumer-timeout is used (`rabbitmqctl environment | grep "
        "consumer_timeout` on the broker shows the real one)"
    )
    not_checked += gatherer.not_checked
    not_checked += [f"{item} (the user needs the monitoring tag)" for item in gatherer.denied]
    if handler_seconds is None:
        not_checked.append("handler duration against consumer_timeout: give --handler-seconds")

    findings: list[Finding] = []
    for problem in unreachable:
        findings.append(
            Finding(
                "warning",
                "unreachable",
                f"a configured broker did not answer: {problem}",
                f"doctor used {address.display}; a worker falls back the same way.",
                "check that node, or remove it from --url",
            )
        )
    findings += _heartbeat_findings(requested, negotiated)
    management_display = target.display
    if management_available:
        findings.append(Finding("ok", "management", f"management API at {management_display}"))
    else:
        findings.append(
            Finding(
                "info",
                "management",
                f"management API at {management_display}: {status}",
                "Without it doctor sees only what AMQP shows: ready counts and consumer counts.",
                "enable rabbitmq_management on the broker, or give --management-url",
            )
        )
    findings.append(
        Finding(
            "info",
            "consumer-timeout",
            f"consumer_timeout {_seconds(settings.consumer_timeout)} (from --consumer-timeout; "
            "the broker does not expose its own)",
            "RabbitMQ's default is 30 min. If the broker's differs, pass it as "
            "--consumer-timeout: the checks below compare against this value.",
        )
    )
    findings += _configured_findings(
        prefetch, concurrency, handler_seconds, settings.consumer_timeout
    )
    for queue in queue_reports:
        findings += _queue_findings(
            queue,
            version,
            concurrency,
            handler_seconds,
            settings.consumer_timeout,
            dlx_exists.get(queue.name),
        )
    blocked = states["blocked"] if states is not None else None
    blocking = states["blocking"] if states is not None else None
    findings += _alarm_findings(alarms, blocked, blocking)
    return DoctorReport(
        broker=address.display,
        server=server,
        heartbeat_requested=requested,
        heartbeat_negotiated=negotiated,
        management=ManagementReport(management_display, management_available, status),
        consumer_timeout=settings.consumer_timeout,
        consumer_timeout_source="--consumer-timeout",
        prefetch=prefetch,
        concurrency=concurrency,
        handler_seconds=handler_seconds,
        queues=tuple(queue_reports),
        alarms=alarms,
        blocked_connections=blocked,
        blocking_connections=blocking,
        not_checked=tuple(not_checked),
        findings=tuple(findings),
        unreachable=tuple(unreachable),
    )


# -- rendering ---------------------------------------------------------------------------------

_MARKERS = {"ok": "✓", "info": "i", "warning": "!", "critical": "✗"}
_ASCII_MARKERS = {"ok": "+", "info": "i", "warning": "!", "critical": "x"}


def format_report(report: DoctorReport, *, unicode: bool = True) -> str:
    """The report as a readable checklist."""
    markers = _MARKERS if unicode else _ASCII_MARKERS
    server = report.server
    lines = [f"steadyrabbit doctor: {report.broker}"]
    product = " ".join(part for part in (server.product, server.version) if part)
    where = ", ".join(
        part
        for part in (
            f"on {server.platform}" if server.platform else "",
            f"cluster {server.cluster_name}" if server.cluster_name else "",
        )
        if part
    )
    lines.append(f"  server: {product or 'unknown'}" + (f" ({where})" if where else ""))
    capabilities = sorted(name for name, on in server.capabilities.items() if on)
    if capabilities:
        lines.extend(_wrap(f"capabilities: {', '.join(capabilities)}", "  ", "    "))
    handler = (
        _seconds(report.handler_seconds) if report.handler_seconds is not None else "not given"
    )
    prefetch = "unlimited (0)" if report.prefetch == 0 else str(report.prefetch)
    line = (
        f"worker settings: heartbeat {report.heartbeat_requested} s, prefetch "
        f"{prefetch}, concurrency {report.concurrency}, handler {handler}, "
        f"consumer_timeout {_seconds(report.consumer_timeout)}"
    )
    lines.extend(_wrap(line, "  ", "    "))
    for queue in report.queues:
        if not queue.exists:
            continue
        if queue.arguments:
            line = f"queue {queue.name} arguments: {_arguments(queue.arguments)}"
            lines.extend(_wrap(line, "  ", "    "))
        if queue.policy:
            lines.append(f"  queue {queue.name} policy: {queue.policy}")
        for consumer in queue.consumers or ():
            limit = consumer.effective_prefetch
            prefetch = "unlimited" if limit == 0 else str(limit)
            ack = "manual ack" if consumer.ack_required else "auto ack"
            heartbeat = ""
            if consumer.heartbeat == 0:
                heartbeat = ", heartbeats off"
            elif consumer.heartbeat is not None:
                heartbeat = f", heartbeat {consumer.heartbeat} s"
            line = (
                f"queue {queue.name} consumer {_consumer_line(consumer)}: prefetch {prefetch}, "
                f"{ack}{heartbeat}"
            )
            lines.extend(_wrap(line, "  ", "    "))
    lines.append("")
    for finding in report.findings:
        lines.append(f"{markers[finding.level]} {finding.title}")
        if finding.level != "ok":
            lines.extend(_wrap(finding.detail, "    "))
            lines.extend(_wrap(f"fix: {finding.fix}" if finding.fix else "", "    ", "         "))
    if report.not_checked:
        lines.append("")
        lines.append("not checked:")
        for item in report.not_checked:
            lines.extend(_wrap(f"- {item}", "  ", "    "))
    lines.append("")
    counts = [
        _plural(report.count("critical"), "critical finding"),
        _plural(report.count("warning"), "warning"),
    ]
    lines.append(", ".join(counts))
    text = mask_url("\n".join(lines))
    if not unicode:
        text = text.replace("≥", ">=").replace(_TIMES, "x")
    return text


def can_encode(stream: Any, text: str = "✓✗≥" + _TIMES) -> bool:
    """Whether ``stream`` can print ``text`` (the checklist's markers and signs)."""
    encoding = getattr(stream, "encoding", None) or "ascii"
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _arguments(arguments: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in sorted(arguments.items()))


def _wrap(text: str, indent: str, then: str | None = None, width: int = 96) -> list[str]:
    """``text`` in lines of at most ``width``; the first indented by ``indent``, the rest by
    ``then`` (default: the same)."""
    lines: list[str] = []
    current = indent
    for word in text.split():
        if len(current) + len(word) + 1 > width and current.strip():
            lines.append(current.rstrip())
            current = indent if then is None else then
        current += word + " "
    if current.strip():
        lines.append(current.rstrip())
    return lines
