"""The connection supervisor: one per connection, the only code that (re)connects."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from time import monotonic

from ._amqp import AmqpConnection
from ._backoff import backoff_delay
from ._errors import (
    BrokerUnreachableError,
    ClosedByUserError,
    ConnectionLostError,
    PermanentBrokerError,
    SteadyRabbitError,
)
from ._middleware import Hooks
from ._settings import Settings
from ._stats import Stats

log = logging.getLogger("steadyrabbit")


class Supervisor:
    """Keeps one AMQP connection up across all configured brokers.

    Transient failures (reset, missed heartbeats, ``CONNECTION_FORCED``) are retried with
    exponential backoff, jitter and a cap, rotating through the hosts; permanent ones (bad
    credentials, refused access) end :meth:`run` with the error. Before the first connection,
    :attr:`Settings.connect_timeout` bounds the attempts; after it, reconnection never gives up.
    """

    def __init__(
        self, settings: Settings, stats: Stats, *, role: str, hooks: Hooks | None = None
    ) -> None:
        self._settings = settings
        self._hooks = hooks or Hooks()
        self._stats = stats
        self._role = role
        self._current: AmqpConnection | None = None
        self._up = asyncio.Event()
        self._closing = asyncio.Event()
        self._ended: SteadyRabbitError | None = None

    @property
    def role(self) -> str:
        """``consume`` or ``publish``: what the connection is for (logs, metrics)."""
        return self._role

    @property
    def connected(self) -> AmqpConnection | None:
        current = self._current
        return current if current is not None and current.is_open else None

    async def connection(self) -> AmqpConnection:
        """The live connection; waits while reconnecting. Raises once the supervisor has ended."""
        while True:
            if self._ended is not None:
                raise self._ended
            current = self.connected
            if current is not None:
                return current
            # The event means "look again"; it may still be set from a connection that is now
            # closing, and waiting on a set event does not yield: clear it first.
            self._up.clear()
            await self._up.wait()

    def close(self) -> None:
        """Stop reconnecting and close the connection (``run`` then returns)."""
        self._closing.set()
        if self._current is not None:
            self._current.close()

    async def run(self) -> None:
        try:
            await self._run()
        except SteadyRabbitError as exc:
            self._end(exc)
            raise
        finally:
            if self._ended is None:
                self._end(ClosedByUserError(f"{self._role} connection closed"))

    def _end(self, error: SteadyRabbitError) -> None:
        self._ended = error
        self._current = None
        self._up.set()  # wake waiters so they see the end

    async def _run(self) -> None:
        settings = self._settings
        addresses = settings.addresses
        started = monotonic()
        ever_connected = False
        host = 0
        round_failures = 0
        name = f"{settings.name} ({self._role})"
        while not self._closing.is_set():
            address = addresses[host % len(addresses)]
            timeout = settings.connect_timeout
            if not ever_connected:
                timeout = max(1.0, min(timeout, started + settings.connect_timeout - monotonic()))
            try:
                connection = await AmqpConnection.open(
                    address, heartbeat=settings.heartbeat, connect_timeout=timeout, name=name
                )
            except PermanentBrokerError:
                raise
            except ConnectionLostError as exc:
                host += 1
                if not ever_connected and monotonic() - started >= settings.connect_timeout:
                    tried = ", ".join(a.display for a in addresses)
                    raise BrokerUnreachableError(
                        f"no broker answered within {settings.connect_timeout:g} s "
                        f"(tried {tried}); last error: {exc}"
                    ) from exc
                if host % len(addresses) == 0:
                    delay = self._delay(round_failures)
                    round_failures += 1
                    log.warning("%s; retrying in %.1f s", exc, delay)
                    await self._sleep_unless_closing(delay)
                continue
            if self._closing.is_set():
                await connection.aclose()
                return
            if ever_connected:
                log.info("%s connection re-established to %s", self._role, address.display)
            else:
                log.info("%s connection open to %s", self._role, address.display)
            if settings.heartbeat == 0 or connection.negotiated_heartbeat == 0:
                log.warning(
                    "heartbeats are off: a dead broker or network will go unnoticed for minutes"
                )
            ever_connected = True
            round_failures = 0
            self._current = connection
            self._up.set()
            self._hooks.on_connected(self._role, address)
            reason = await connection.closed
            self._current = None
            self._up.clear()
            if isinstance(reason, ClosedByUserError) or self._closing.is_set():
                return
            if isinstance(reason, PermanentBrokerError):
                raise reason
            cause = reason.cause if isinstance(reason, ConnectionLostError) else "unknown"
            self._stats.reconnects[cause] += 1
            self._hooks.on_reconnecting(self._role, cause, reason)
            host += 1
            delay = self._delay(0)
            log.warning("%s; reconnecting in %.1f s", reason, delay)
            await self._sleep_unless_closing(delay)

    def _delay(self, attempt: int) -> float:
        return backoff_delay(
            attempt,
            base=self._settings.reconnect_delay,
            cap=self._settings.reconnect_delay_max,
            random=random.random,
        )

    async def _sleep_unless_closing(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), delay)

