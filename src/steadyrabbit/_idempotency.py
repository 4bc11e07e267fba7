"""Exactly-once effects and jobs longer than ``consumer_timeout``: the built-in middleware
:class:`Leases`, on the records of :mod:`._leases`.

**Duplicates.** RabbitMQ delivers at least once: after a reset, messages whose acks were lost
come back. A message with a key (by default its ``message_id`` with a digest of its body, so a
producer that reuses ids loses nothing; a consumer may give its own key function) takes a
lease before its handler runs:

- a copy of a message that completed before is acked without running, logged and counted;
- a copy that arrives while a run holds the lease (redelivered after a reset while the first
  run goes on) waits for that run's outcome and never runs beside it;
- a failed run releases the lease, so its retry runs.

**Long jobs.** A handler still running when its delivery nears ``consumer_timeout`` (at
:data:`._gate.HANDOFF_SHARE` of it) is *handed off*: a marker copy goes to steadyrabbit's own delay
queue, confirmed, then the delivery is acked and the handler runs on under its lease, renewed
every third of ``lease``. When the marker comes back, the run is done (the marker is dropped),
alive (delayed again) or dead (the job runs). A message without a key gets a lease of its own
when it is handed off. A consumer that declares ``max_duration`` on RabbitMQ 3.12 or later gets
that budget as its ``x-consumer-timeout`` instead, and is never handed off.

A failing store is logged in one line and the message handled without a record: at least once,
never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from time import monotonic
from typing import TYPE_CHECKING, Any, Protocol

from . import _headers
from ._errors import ConfigurationError
from ._leases import Acquired, LeaseStore, SQLiteLeaseStore, Verdict, WriteBehind
from ._message import Message, wire_headers
from ._middleware import CallNext, Middleware
from ._url import mask_url

if TYPE_CHECKING:
    from ._stats import QueueCounts
    from ._view import WorkerView

log = logging.getLogger("steadyrabbit")

#: Records are pruned this often.
_PRUNE_EVERY = 3600.0
#: Keys of completed runs a worker remembers itself (a copy of one is acked at once): at least
#: this many, the latest, in two generations of this many each.
_REMEMBERED_DONE = 10_000
_RUN = Acquired(Verdict.RUN)
_DONE = Acquired(Verdict.DONE)
_REDELAY = Acquired(Verdict.REDELAY)

KeyFunction = Callable[[Message], "str | None"]


class LeaseHolder(Protocol):
    """What :class:`Leases` needs of a consumer."""

    @property
    def counts(self) -> QueueCounts: ...

    @property
    def handoff_after(self) -> float | None:
        """Seconds after delivery at which a run is handed off; None: never."""
        ...

    def running_messages(self) -> Iterable[Message]: ...

    async def hand_off(self, message: Message, lease: Mapping[str, str], delay: float) -> bool: ...


def lease_store(url: str | None, state_dir: Path) -> LeaseStore:
    """The store ``Settings.idempotency_store`` names: None, a SQLite file in ``state_dir``."""
    if url is None:
        return SQLiteLeaseStore(state_dir / "leases.sqlite3")
    if url.startswith(("postgresql://", "postgres://")):
        from ._store_postgres import PostgresLeaseStore

        return PostgresLeaseStore(url)
    from ._store_redis import RedisLeaseStore

    return RedisLeaseStore(url)


def default_key(message: Message, vhost: str) -> str | None:
    """``message_id`` with a digest of the body, per queue; None without a ``message_id``."""
    message_id = message.message_id
    if not message_id:
        return None
    return _digest(_key_prefix(vhost, message.queue), message_id, message.body)


def _key_prefix(vhost: str, queue: str) -> bytes:
    return vhost.encode() + b"\0" + queue.encode() + b"\0"


def _digest(prefix: bytes, message_id: str, body: bytes) -> str:
    # sha256 of vhost, queue, message_id and body joined by NULs; 128 bits of it: short rows,
    # and no collision in sight.
    return _sha256(prefix + message_id.encode() + b"\0" + body).hexdigest()[:32]


_sha256 = hashlib.sha256


class Leases(Middleware):
    """One worker's leases (see the module documentation). ``keys``: per queue, the consumer's
    own key function, or None for the default; a queue missing from ``keys`` is not
    deduplicated (its long runs are still handed off)."""

    def __init__(
        self,
        store: LeaseStore,
        *,
        owner: str,
        vhost: str,
        consumers: Mapping[str, LeaseHolder],
        keys: Mapping[str, KeyFunction | None],
        lease: float,
        retention: float,
    ) -> None:
        self._store = store
        # The embedded store writes what every message writes behind it, in a batch up to
        # 100 ms later: a copy of a run that ended before its batch landed, redelivered to
        # another process by then, may run again (see _leases._WRITE_BEHIND_DELAY).
        self._behind = store if isinstance(store, WriteBehind) else None
        self._owner = owner
        self._vhost = vhost
        self._consumers = consumers
        # Per queue: its consumer's key function, or for the default key the queue's prefix
        # of what it digests (encoded once, not per message).
        self._keys: dict[str, KeyFunction | bytes] = {
            queue: _key_prefix(vhost, queue) if custom is None else custom
            for queue, custom in keys.items()
        }
        self._lease = lease
        self._retention = retention
        self._tokens = (f"{owner}/{n}" for n in itertools.count(1))
        # Runs of this process by key: a copy that arrives meanwhile waits on the future.
        self._runs: dict[str, asyncio.Future[None]] = {}
        # The token of each run of this process, by key, and the keys it completed lately: a
        # copy that comes back to this process needs no store round trip. Completions are kept
        # in two generations of sets, the older dropped whole when the newer is full: forgetting
        # the oldest key one at a time from an ordered dict cost microseconds per message (its
        # first live entry is found by skipping every deleted one before it).
        self._running: dict[str, str] = {}
        self._done: set[str] = set()
        self._done_before: set[str] = set()
        # Runs without a key that were handed off: the keeper ends their leases.
        self._unkeyed: dict[Message, tuple[str, str]] = {}
        self._keeper: asyncio.Task[None] | None = None
        self._store_failures = 0
        self._tick = lease / 3

    @property
    def store(self) -> LeaseStore:
        return self._store

    # -- lifecycle

    async def on_worker_start(self, worker: WorkerView) -> None:
        try:
            await self._store.open()
        except Exception as exc:  # noqa: BLE001 - whatever the store raised, in one sentence
            raise ConfigurationError(
                f"the idempotency store {self._store.description} is not usable "
                f"({type(exc).__name__}: {mask_url(str(exc))}); fix it, or set "
                "idempotency_store to another one"
            ) from None
        handoffs = [
            after for c in self._consumers.values() if (after := c.handoff_after) is not None
        ]
        # Often enough to renew leases and to hand off on time.
        self._tick = min([self._lease / 3, *(after / 6 for after in handoffs)])
        self._keeper = asyncio.get_running_loop().create_task(
            self._keep(), name="steadyrabbit-leases"
        )

    async def on_worker_stop(self, worker: WorkerView) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
        await self._store.close()

    # -- a lost connection or channel

    def on_reconnecting(self, role: str, cause: str, error: Exception) -> None:
        self._write_now()

    def on_channel_lost(self, queue: str, error: Exception) -> None:
        self._write_now()

    def _write_now(self) -> None:
        # The broker requeues what this worker had not acked yet, and may hand it to another
        # process at once: that process must find these runs' leases and done records, so
        # what the embedded store holds back goes to the database now, not at its batch's
        # delay.
        if self._behind is not None:
            self._behind.write_now()

    # -- each message

    # A plain function, not a coroutine: a message without a key goes straight to the handler,
    # with no frame of this middleware around it (the hot path of most workloads).
    def around_handler(  # type: ignore[override]
        self, message: Message, call_next: CallNext
    ) -> Awaitable[Any]:
        headers = wire_headers(message)
        marker = headers.get(_headers.LEASE_TOKEN) if headers else None
        if marker is not None:
            key = _headers.header_text((headers or {}).get(_headers.LEASE_KEY))
            if key is None:
                return call_next(message)
            return self._run_keyed(message, key, _headers.header_text(marker), call_next)
        keyed = self._keys.get(message.queue)
        if keyed is None:
            return call_next(message)
        if type(keyed) is bytes:
            message_id = message.message_id
            if not message_id:
                return call_next(message)
            key = _digest(keyed, message_id, message.body)
        else:
            assert callable(keyed)
            key = keyed(message)
            if key is None:
                return call_next(message)
        behind = self._behind
        if (
            behind is None
            or message.redelivered
            or key in self._running
            or key in self._done
            or key in self._done_before
        ):
            return self._run_keyed(message, key, None, call_next)
        # The common case, with no wait: a first delivery this worker has not seen run or
        # complete. The broker says no earlier run of it exists, so its lease is written
        # behind it, without reading the record first.
        token = next(self._tokens)
        behind.queue_begin(key, token, self._lease)
        message.lease = (key, token)
        self._running[key] = token
        return self._run_first(message, behind, call_next)

    async def _run_first(self, message: Message, behind: WriteBehind, call_next: CallNext) -> Any:
        """Run a first delivery whose lease is written behind it (see :meth:`around_handler`)
        and write its done record behind it too: no wait in this frame but the handler's."""
        try:
            result = await call_next(message)
        except BaseException as error:
            if message.lease is not None:
                await self._finish(message, error)
            raise
        lease = message.lease
        if lease is not None:
            self._completed(message, lease)
            behind.queue_complete(*lease, self._retention)
        return result

    async def _run_keyed(
        self, message: Message, key: str, marker: str | None, call_next: CallNext
    ) -> Any:
        """Run a message whose record must be read first (a marker, a redelivery, a copy of a
        run of this process) or whose store writes are waited for."""
        if not await self._admit(message, key, marker):
            return None
        try:
            result = await call_next(message)
        except BaseException as error:
            if message.lease is not None:
                await self._finish(message, error)
            raise
        lease = message.lease
        if lease is not None:
            if self._behind is not None:
                self._completed(message, lease)
                self._behind.queue_complete(*lease, self._retention)
            else:
                await self._finish(message, None)
        return result

    async def _admit(self, message: Message, key: str, marker: str | None) -> bool:
        """Take the lease of ``key`` for this run: True to run the handler; False when the
        message was settled here (a duplicate, a marker), which the core then acks."""
        while True:
            token = next(self._tokens)
            try:
                acquired = self._local_verdict(key, marker)
                if acquired is None:
                    if marker is None and not message.redelivered:
                        # A first delivery: the broker says no earlier run of it exists, so
                        # the lease is written without reading the record first (by the
                        # embedded store in its next batch, not waited for).
                        if self._behind is not None:
                            self._behind.queue_begin(key, token, self._lease)
                        else:
                            await self._store.begin(key, token, self._lease)
                        acquired = _RUN
                    else:
                        acquired = await self._store.acquire(
                            key, token, self._lease, marker=marker
                        )
            except Exception as exc:  # noqa: BLE001 - any store error: run without a record
                self._store_failed("take the lease of", message, exc)
                return True
            verdict = acquired.verdict
            if verdict is Verdict.RUN:
                message.lease = (key, token)
                self._running[key] = token
                return True
            counts = self._consumers[message.queue].counts
            if verdict is Verdict.DONE:
                counts.duplicates += 1
                log.info(
                    "acked %r (message id %s) without running it: it completed before",
                    message,
                    message.message_id,
                )
                return False
            if verdict is Verdict.DROP:
                counts.markers += 1
                log.debug("dropped the marker %r: its run is over", message)
                return False
            if verdict is Verdict.REDELAY:
                await self._leave_marker(message, key, str(marker))
                return False
            # RUNNING: wait for that run's outcome, as long as this delivery may wait.
            holder = acquired.holder or ""
            if not await self._wait_for(key, holder, message):
                await self._leave_marker(message, key, holder)
                return False

    def _local_verdict(self, key: str, marker: str | None) -> Acquired | None:
        """What this process's own runs and completions say, with no store round trip; None
        when only the store can tell."""
        holder = self._running.get(key)
        if marker is None:
            if holder is not None:
                return Acquired(Verdict.RUNNING, holder)
            if key in self._done or key in self._done_before:
                return _DONE
        elif holder == marker:
            return _REDELAY
        return None

    def _completed(self, message: Message, lease: tuple[str, str]) -> None:
        """The run holding ``lease`` completed: remember it, and wake a copy waiting for it."""
        key, token = lease
        done = self._done
        done.add(key)
        if len(done) >= _REMEMBERED_DONE:
            self._done_before = done
            self._done = set()
        self._ended(message, key, token)

    def _ended(self, message: Message, key: str, token: str) -> None:
        message.lease = None
        if self._running.get(key) == token:
            del self._running[key]
        run = self._runs.pop(key, None)
        if run is not None and not run.done():
            run.set_result(None)

    async def _finish(self, message: Message, error: BaseException | None) -> None:
        lease = message.lease
        assert lease is not None
        key, token = lease
        try:
            if error is None:
                await self._store.complete(key, token, self._retention)
                self._completed(message, lease)
                return
            if message.handed_off and isinstance(error, Exception):
                # The outcome goes to a retry or dead-letter copy: drop the marker.
                await self._store.resolve(key, token, self._retention)
            else:
                await self._store.release(key, token)
        except Exception as exc:  # noqa: BLE001 - logged; the lease expires by itself
            self._store_failed("record the end of", message, exc)
        finally:
            if message.lease is not None:
                self._ended(message, key, token)

    async def _wait_for(self, key: str, holder: str, message: Message) -> bool:
        """Wait until the run holding ``key`` ends; False if this delivery ran out of time
        first (it then becomes that run's marker)."""
        consumer = self._consumers[message.queue]
        after = consumer.handoff_after
        patience = (
            (message.received_at + after - monotonic()) if after is not None else self._lease
        )
        if holder.rpartition("/")[0] == self._owner:
            run = self._runs.setdefault(key, asyncio.get_running_loop().create_future())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(run), max(patience, 0))
            return run.done()
        # A run of another process: its record is the only news of it, so this polls (no
        # event crosses processes or hosts). Each look asks the marker's question: REDELAY
        # while that run lives. If it died, the look takes its lease over for 0 s, which the
        # next turn of the caller's loop takes over again for real.
        deadline = monotonic() + patience
        while monotonic() < deadline:
            await asyncio.sleep(min(1.0, self._lease / 4, max(deadline - monotonic(), 0)))
            try:
                acquired = await self._store.acquire(
                    key, next(self._tokens), 0.0, marker=holder
                )
            except Exception as exc:  # noqa: BLE001
                self._store_failed("look up", message, exc)
                return True  # take the verdict again from the top
            if acquired.verdict is not Verdict.REDELAY:
                return True
        return False

    async def _leave_marker(self, message: Message, key: str, token: str) -> None:
        consumer = self._consumers[message.queue]
        if await consumer.hand_off(
            message, {_headers.LEASE_KEY: key, _headers.LEASE_TOKEN: token}, self._lease
        ):
            consumer.counts.markers += 1

    # -- the keeper: renewals, hand-offs, pruning

    async def _keep(self) -> None:
        pruned_at = monotonic()
        while True:
            await asyncio.sleep(self._tick)
            now = monotonic()
            held: list[tuple[str, str]] = []
            due: list[tuple[LeaseHolder, Message]] = []
            running: set[Message] = set()
            for consumer in self._consumers.values():
                after = consumer.handoff_after
                for message in consumer.running_messages():
                    running.add(message)
                    if message.lease is not None:
                        held.append(message.lease)
                    due_now = after is not None and now - message.received_at >= after
                    if due_now and not message.handed_off:
                        due.append((consumer, message))
            try:
                await self._store.renew(held, self._lease)
            except Exception as exc:  # noqa: BLE001
                self._store_failed("renew the leases of", f"{len(held)} runs", exc)
            await self._finish_unkeyed(running)
            if due:
                await asyncio.gather(*(self._hand_off(c, m) for c, m in due))
            if now - pruned_at >= _PRUNE_EVERY:
                pruned_at = now
                try:
                    pruned = await self._store.prune()
                except Exception as exc:  # noqa: BLE001
                    self._store_failed("prune", "old records", exc)
                else:
                    log.debug("pruned %d lease record(s)", pruned)

    async def _finish_unkeyed(self, running: set[Message]) -> None:
        """The runs without a key that were handed off and have ended since the last tick:
        their marker is to be dropped, whatever the outcome (a failure's copy stands for it).
        They run with no frame of this middleware around them, so the keeper ends them."""
        ended = [m for m in self._unkeyed if m not in running]
        for message in ended:
            key, token = self._unkeyed.pop(message)
            message.lease = None
            try:
                await self._store.complete(key, token, self._retention)
            except Exception as exc:  # noqa: BLE001 - the lease expires by itself
                self._store_failed("record the end of", message, exc)

    async def _hand_off(self, consumer: LeaseHolder, message: Message) -> None:
        try:
            if message.lease is None:
                token = next(self._tokens)
                key = f"handoff/{token}"
                await self._store.acquire(key, token, self._lease)
                message.lease = (key, token)
                self._unkeyed[message] = message.lease
            key, token = message.lease
            if await consumer.hand_off(
                message, {_headers.LEASE_KEY: key, _headers.LEASE_TOKEN: token}, self._lease
            ):
                log.info(
                    "handed off %r: its handler runs on past the broker's consumer_timeout "
                    "under a lease; a marker waits in the delay queue",
                    message,
                )
        except Exception as exc:  # noqa: BLE001 - the broker may close the channel instead
            self._store_failed("hand off", message, exc)

    def _store_failed(self, action: str, subject: object, exc: Exception) -> None:
        self._store_failures += 1
        log.error(
            "could not %s %s (%s: %s) in %s; handling it without a record "
            "(%d failure(s) so far)",
            action,
            subject,
            type(exc).__name__,
            exc,
            self._store.description,
            self._store_failures,
        )
