"""doctor's eyes: connect as a worker would, collect the facts, then let the rules judge.

:func:`diagnose` is the entry point. AMQP alone gives the server's version and capabilities,
the negotiated heartbeat, and each queue's ready count and consumer count (passive
declarations, which change nothing). The management HTTP API, when reachable and of the same
cluster, adds queue types and arguments, unacked counts, the live consumers' prefetch and ack
mode, retry queues, alarms and blocked connections, and the cluster: its members (running,
partitioned) and where each queue of the family (the queue, its dead-letter and retry queues)
lives. Whatever could not be checked is listed in
the report. The broker's version also says how long runs are protected
(``_topology.long_run_protection``), and the lease store a worker would open is opened, read and
closed (:func:`_lease_store`). Secrets never enter the report: URLs are masked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
import uuid
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from ..._amqp import ACCESS_REFUSED, NOT_FOUND, AmqpChannel, AmqpConnection, first_connection
from ..._crashlog import default_state_dir
from ..._errors import ChannelClosedError, ConfigurationError
from ..._headers import header_text
from ..._idempotency import lease_store
from ..._leases import LeaseStore, SQLiteLeaseStore
from ..._settings import Settings
from ..._topology import dead_letter_queue_name, long_run_protection, retry_queue_pattern
from ..._url import mask_url
from .management import (
    ManagementClient,
    ManagementDenied,
    ManagementUnavailable,
    management_target,
)
from .report import (
    ConsumerReport,
    DoctorReport,
    IdempotencyReport,
    ManagementReport,
    NodeReport,
    PlacementReport,
    PlacementRole,
    QueueReport,
    RetryQueueReport,
    ServerReport,
)
from .rules import applicable_consumer_timeout, judge

__all__ = ["diagnose"]

# A management API request may take as long as connecting to the broker, but no longer than this.
_MANAGEMENT_TIMEOUT_MAX = 10.0
# Opening, reading and closing the lease store, at most (a database that does not answer).
_STORE_TIMEOUT_MAX = 5.0


def _quote(name: str) -> str:
    return quote(name, safe="")


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


_text = header_text


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


def _dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def _names(value: Any) -> tuple[str, ...] | None:
    return tuple(str(name) for name in value) if isinstance(value, list) else None


# What the placement of a queue needs from the management API (a listing takes these columns).
_PLACEMENT_COLUMNS = (
    "name,type,node,leader,members,online,arguments,policy,effective_policy_definition,"
    "delivery_limit"
)


def _placement(data: dict[str, Any], role: PlacementRole) -> PlacementReport:
    """Where a queue lives, from its management API entry. A classic queue has a ``node``; a
    quorum queue or a stream has ``members``, ``online`` and ``leader`` (its ``node`` is the
    leader's too)."""
    members = _names(data.get("members"))
    limit = data.get("delivery_limit")
    return PlacementReport(
        name=str(data.get("name")),
        role=role,
        type=_text(data.get("type")),
        node=_text(data.get("node")) if members is None else None,
        leader=_text(data.get("leader")),
        members=members,
        online=_names(data.get("online")) if members is not None else None,
        arguments=_dict(data.get("arguments")),
        policy=_text(data.get("policy")),
        effective_policy=_dict(data.get("effective_policy_definition")),
        delivery_limit=limit if isinstance(limit, int | str) else None,
    )


class _Gatherer:
    """Collects the facts; findings are derived from them afterwards."""

    def __init__(
        self,
        channels: _Channels,
        management: ManagementClient | None,
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

    def _management_lost(self, exc: ManagementUnavailable) -> None:
        self.management = None
        self.not_checked.append(f"the management API stopped answering: {exc}")

    async def _api(self, path: str, **params: str | int) -> Any:
        """GET through the management API; None when unavailable, denied or not found."""
        if self.management is None:
            return None
        try:
            return await self.management.get(path, **params)
        except ManagementDenied as exc:
            self.denied.append(str(exc))
        except ManagementUnavailable as exc:
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

    async def queue(self, name: str) -> QueueReport:
        dlq = dead_letter_queue_name(name)
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
            name=retry_queue_pattern(name),
            use_regex="true",
            columns=f"messages,{_PLACEMENT_COLUMNS}",
        )
        retry_queues = None
        retry_items: list[dict[str, Any]] = []
        if isinstance(retry, dict):
            retry_items = [item for item in retry.get("items") or [] if isinstance(item, dict)]
            retry_queues = tuple(
                RetryQueueReport(str(item.get("name")), _int(item.get("messages")))
                for item in retry_items
            )
        placements = [_placement(data, "queue")]
        if report.dead_letter_queue_exists:
            dlq_data = await self._api(
                f"queues/{self.vhost}/{_quote(dlq)}", columns=_PLACEMENT_COLUMNS
            )
            if isinstance(dlq_data, dict):
                placements.append(_placement(dlq_data, "dead-letter"))
        placements += [_placement(item, "retry") for item in retry_items]
        timeout, source = applicable_consumer_timeout(
            arguments, policy, self.version, self.consumer_timeout
        )
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
            placements=tuple(placements),
        )

    async def nodes(self) -> tuple[NodeReport, ...] | None:
        """The cluster's members: running or not, and the members each cannot see."""
        nodes = await self._api("nodes", columns="name,running,partitions")
        if not isinstance(nodes, list):
            return None
        return tuple(
            NodeReport(
                name=str(node.get("name")),
                running=bool(node.get("running")),
                partitions=_names(node.get("partitions")) or (),
            )
            for node in nodes
            if isinstance(node, dict)
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


async def _lease_store(settings: Settings) -> IdempotencyReport:
    """The lease store a worker with ``settings`` opens at start: opened, read and closed
    within a few seconds. A SQLite file that does not exist yet is not created (doctor may
    run as another user than the worker): doctor checks that a worker could create it."""
    enabled = settings.idempotency
    state_dir = settings.state_dir or default_state_dir()
    try:
        store: LeaseStore = lease_store(settings.idempotency_store, state_dir)
    except Exception as exc:  # noqa: BLE001 - a bad URL, a missing extra: one sentence
        shown = mask_url(settings.idempotency_store or str(state_dir))
        return IdempotencyReport(shown, enabled, "unusable", _problem(exc))
    if isinstance(store, SQLiteLeaseStore) and not store.path.exists():
        problem = _cannot_create(store.path)
        if problem is not None:
            return IdempotencyReport(store.description, enabled, "unusable", problem)
        return IdempotencyReport(store.description, enabled, "not-created")
    timeout = min(settings.connect_timeout, _STORE_TIMEOUT_MAX)
    try:
        with _LastWarning("psycopg") as warned:  # the pool retries, and says why in its log
            async with asyncio.timeout(timeout):
                await store.open()
                seen = await store.report()
    except TimeoutError:
        why = f" (last: {mask_url(warned.text)})" if warned.text else ""
        return IdempotencyReport(
            store.description, enabled, "unusable", f"no answer within {timeout:g} s{why}"
        )
    except Exception as exc:  # noqa: BLE001 - whatever the store raised, in one sentence
        return IdempotencyReport(store.description, enabled, "unusable", _problem(exc))
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(store.close(), timeout)
    oldest = None if seen.oldest is None else max(0.0, time.time() - float(seen.oldest))
    return IdempotencyReport(
        store.description,
        enabled,
        "reachable",
        records=seen.records,
        running=seen.running,
        oldest_age=oldest,
    )


class _LastWarning(logging.Handler):
    """The last warning of a library's logger while in use, its first line; kept out of
    doctor's output."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.WARNING)
        self._logger = logging.getLogger(name)
        self._propagate = self._logger.propagate
        self.text = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.text = " ".join(record.getMessage().split("\n", 1)[0].split())

    def __enter__(self) -> _LastWarning:
        self._logger.addHandler(self)
        self._logger.propagate = False
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._logger.removeHandler(self)
        self._logger.propagate = self._propagate


def _problem(exc: BaseException) -> str:
    """An exception as the end of one sentence, on one line, secrets masked: the system's
    reason when the chain has one (``connection refused``), else the exception itself."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno and cause.errno > 0:
            return os.strerror(cause.errno).lower()
        cause = cause.__cause__ or cause.__context__
    text = " ".join(str(exc).split()).rstrip(".")
    return mask_url(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def _cannot_create(path: Path) -> str | None:
    """Why this user could not create ``path`` (and the directories above it); None if it can."""
    directory = path.parent
    while not directory.exists() and directory.parent != directory:
        directory = directory.parent
    if not directory.is_dir():
        return f"{directory} is not a directory"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"{directory} is not writable by this user"
    return None


async def _probe(management: ManagementClient, cluster_name: str | None) -> str:
    """Return "available", or why the management API cannot be used.

    A management API of another broker (the default URL guesses the port) is not used.
    """
    try:
        overview = await management.get("overview")
    except (ManagementUnavailable, ManagementDenied) as exc:
        return f"not available: {exc}"
    if not isinstance(overview, dict) or "management_version" not in overview:
        return "not available: it did not answer as the management API"
    theirs = _text(overview.get("cluster_name"))
    if cluster_name and theirs and theirs != cluster_name:
        return f"not used: it belongs to cluster {theirs!r}, not to the broker's {cluster_name!r}"
    return "available"


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
    adaptive = prefetch is None
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
        requested = address.heartbeat if address.heartbeat is not None else settings.heartbeat
        negotiated = connection.negotiated_heartbeat
        # doctor does not see the handlers: a consumer without max_duration.
        long_runs = long_run_protection(connection.server_version, None)
        timeout = min(settings.connect_timeout, _MANAGEMENT_TIMEOUT_MAX)
        async with httpx.AsyncClient(
            auth=(target.username, target.password), timeout=timeout, follow_redirects=False
        ) as client:
            management: ManagementClient | None = ManagementClient(client, target)
            status = await _probe(ManagementClient(client, target), server.cluster_name)
            if status != "available":
                management = None
            channels = _Channels(connection)
            gatherer = _Gatherer(
                channels, management, address.vhost, server.release, settings.consumer_timeout
            )
            try:
                queue_reports = [await gatherer.queue(name) for name in queues]
                dlx_exists: dict[str, bool | None] = {}
                for queue in queue_reports:
                    if queue.dead_letter_exchange and not queue.dead_letter_queue_exists:
                        dlx_exists[queue.name] = await channels.exchange_exists(
                            queue.dead_letter_exchange
                        )
                nodes = await gatherer.nodes()
                alarms = await gatherer.alarms()
                states = await gatherer.blocked(name)
            finally:
                channels.close()
            management_available = gatherer.management is not None
    store = await _lease_store(settings)

    not_checked: list[str] = []
    if not management_available:
        not_checked += [
            "queue types and arguments (x-dead-letter-exchange, x-consumer-timeout), "
            "unacked counts, message rates",
            "the live consumers' prefetch, ack mode and heartbeats",
            "retry queues (<queue>.retry.<ms>ms)",
            "memory and disk alarms, blocked connections",
            "the cluster: its members, partitions, and where each queue is replicated",
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

    blocked = states["blocked"] if states is not None else None
    blocking = states["blocking"] if states is not None else None
    seen = DoctorReport(
        broker=address.display,
        server=server,
        heartbeat_requested=requested,
        heartbeat_negotiated=negotiated,
        management=ManagementReport(target.display, management_available, status),
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
        findings=(),
        unreachable=tuple(unreachable),
        idempotency=store,
        long_runs=long_runs,
        nodes=nodes,
        adaptive_prefetch=adaptive,
    )
    return replace(seen, findings=judge(seen, dlx_exists))
