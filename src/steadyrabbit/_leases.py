"""Leases and done records: one run at a time per message, and none after it completed.

A record per message key (see :mod:`._idempotency` for the key):

- ``running``: a run holds the lease, with its ``owner`` (the worker process), its ``token``
  (this run) and its ``expires`` time, renewed while the handler runs;
- ``done``: the handler completed; a copy that arrives later is acked without running;
- ``resolved``: the run's outcome went elsewhere (a retry or dead-letter copy, after the run
  had been handed off): a new copy of the message may run, the run's old marker may not.

What a caller asks (:meth:`LeaseStore.acquire`) and what it gets (:class:`Verdict`) is the same
for every store; :class:`SQLiteLeaseStore` is the embedded default for one host, and the
PostgreSQL and Redis stores share the records across hosts.

A *marker* is the copy a long run leaves in steadyrabbit's own delay queue when it acks its
delivery early (a hand-off, so that the broker's ``consumer_timeout`` never fires). It carries
the key and the token of the run it stands for. When it comes back, the run may be done
(drop it), still alive (delay it again) or dead (run the job).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger("steadyrabbit")

__all__ = [
    "Acquired",
    "LeaseStore",
    "SQLiteLeaseStore",
    "StoreReport",
    "Verdict",
    "WriteBehind",
    "this_process",
]


class Verdict(enum.Enum):
    """What a run may do with a message, from its record."""

    RUN = "run"  # the lease is the caller's now
    DONE = "done"  # completed before: ack without running
    RUNNING = "running"  # another run holds a live lease: wait for its outcome
    DROP = "drop"  # a marker whose run is over (done, or its outcome went elsewhere)
    REDELAY = "redelay"  # a marker whose run is still alive: delay it again


@dataclass(frozen=True, slots=True)
class Acquired:
    verdict: Verdict
    #: With RUNNING: the token of the run that holds the lease (a marker stands for it).
    holder: str | None = None


@dataclass(frozen=True, slots=True)
class StoreReport:
    """What ``doctor`` shows of a store."""

    store: str
    records: int
    running: int
    oldest: float | None  # seconds since the epoch of the oldest record's last change


class LeaseStore(Protocol):
    """Where leases and done records live. Every method may raise the store's own errors (a
    database that is down); the caller logs them and handles the message without a record."""

    #: Shown in logs, doctor and errors (no password).
    description: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def acquire(
        self, key: str, token: str, lease: float, *, marker: str | None = None
    ) -> Acquired:
        """Take the lease of ``key`` for run ``token`` if the message may run.

        ``marker``: the token of the run a returning marker stands for; it runs only if that
        run died (its lease expired, or its process is gone), and is dropped if that run is
        over. A marker whose record is missing runs: at least once, never lost.
        """
        ...

    async def begin(self, key: str, token: str, lease: float) -> None:
        """Record the lease of a first delivery without reading the record first: the broker
        says no earlier run of this delivery exists, so there is no verdict to wait for (a
        record of a live run or a done one is left as it is)."""
        ...

    async def renew(self, leases: Sequence[tuple[str, str]], lease: float) -> None:
        """Extend the leases (key, token) still held by those runs to ``lease`` from now."""
        ...

    async def complete(self, key: str, token: str, retention: float) -> None:
        """The run finished: a done record, kept ``retention`` seconds."""
        ...

    async def release(self, key: str, token: str) -> None:
        """The run failed (or was abandoned) before any hand-off: the next copy may run."""
        ...

    async def resolve(self, key: str, token: str, retention: float) -> None:
        """The run was handed off and its outcome went to a copy: its marker is to be dropped,
        and that copy (or any new one) may run."""
        ...

    async def prune(self) -> int:
        """Delete records past their retention; return how many."""
        ...

    async def report(self) -> StoreReport: ...


@runtime_checkable
class WriteBehind(Protocol):
    """A store that can queue what every message writes (the lease of a first delivery, the
    done record) without the caller waiting: an embedded one whose writes land within the
    event-loop turn's batch."""

    def queue_begin(self, key: str, token: str, lease: float) -> None: ...

    def queue_complete(self, key: str, token: str, retention: float) -> None: ...


# -- who holds a lease -----------------------------------------------------------------------


def this_process() -> str:
    """This worker process as a lease owner: host, pid and the process's start time, so that a
    pid reused by another process is not taken for the owner."""
    return f"{socket.gethostname()}/{os.getpid()}/{_start_time(os.getpid())}"


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # Field 22, after the command name (which may hold spaces, in parentheses).
            return stat.read().rpartition(b")")[2].split()[19].decode()
    except (OSError, IndexError):
        return "?"


def owner_gone(owner: str, *, host: str | None = None) -> bool:
    """True if ``owner`` ran on this host and that process no longer exists. An owner on
    another host is never declared gone: its lease must expire."""
    owner_host, _, rest = owner.partition("/")
    if owner_host != (host or socket.gethostname()):
        return False
    pid_text, _, started = rest.partition("/")
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    if pid == os.getpid():
        return started != _start_time(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, someone else's
    return started not in ("?", _start_time(pid))


# -- SQLite: one host ----------------------------------------------------------------------------


class SQLiteLeaseStore:
    """Leases and done records in a SQLite file (WAL), for the workers of one host.

    Every operation of one event-loop turn goes to the database in one transaction, on one
    thread: a thousand messages in flight cost one commit per turn, not two each.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"sqlite:{path}"
        self._db: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[
            tuple[
                str | Callable[[sqlite3.Connection], Any],
                tuple[Any, ...],
                asyncio.Future[Any] | None,
            ]
        ] = []
        self._flush: asyncio.Handle | asyncio.TimerHandle | None = None
        self._flush_later = False
        # The pending batch's lease writes by key (their index in it), so that a run that
        # ends before the batch is written costs one row, not two.
        self._unwritten_begins: dict[str, int] = {}
        self._host = socket.gethostname()

    # -- lifecycle

    async def open(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="steadyrabbit-leases")
        await asyncio.get_running_loop().run_in_executor(self._executor, self._connect)

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        # A done record lost to a power cut costs at most a duplicate run; a fsync per
        # transaction would cost every message.
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS leases ("
            " key TEXT PRIMARY KEY, state TEXT NOT NULL, token TEXT NOT NULL,"
            " owner TEXT NOT NULL, expires REAL NOT NULL, updated REAL NOT NULL)"
        )
        # No index beside the key: every message writes its row twice, and the hourly prune
        # can afford a scan.
        db.execute("DROP INDEX IF EXISTS leases_expires")
        self._db = db

    async def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._run_pending()
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.get_running_loop().run_in_executor(executor, self._disconnect)
            executor.shutdown(wait=True)

    def _disconnect(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- batching: every operation of a loop turn in one transaction

    def _submit(
        self, operation: str | Callable[[sqlite3.Connection], Any], args: tuple[Any, ...] = ()
    ) -> asyncio.Future[Any]:
        """Queue ``operation`` for this loop turn's transaction: :data:`_BEGIN` or
        :data:`_COMPLETE` (run once for it and its neighbours of the same kind, ``args`` the
        row with times relative to now) or a function of the connection."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue(operation, args, future, loop)
        return future

    def _queue(
        self,
        operation: str | Callable[[sqlite3.Connection], Any],
        args: tuple[Any, ...],
        future: asyncio.Future[Any] | None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._pending.append((operation, args, future))
        if future is not None:
            if self._flush is not None and self._flush_later:
                self._flush.cancel()
                self._flush = None
            if self._flush is None:
                self._flush_later = False
                self._flush = (loop or asyncio.get_running_loop()).call_soon(self._run_pending)
        elif self._flush is None:
            # Nobody waits for a write behind: gather a few milliseconds of them into one
            # transaction (a commit per turn would cost more than the rows).
            self._flush_later = True
            self._flush = (loop or asyncio.get_running_loop()).call_later(
                _WRITE_BEHIND_DELAY, self._run_pending
            )

    # -- write-behind: what every message writes, queued and not waited for

    def queue_begin(self, key: str, token: str, lease: float) -> None:
        """:meth:`begin`, written with the next batch; a failure is logged."""
        self._unwritten_begins[key] = len(self._pending)
        self._queue(_BEGIN, (key, token, token.rpartition("/")[0], lease), None)

    def queue_complete(self, key: str, token: str, retention: float) -> None:
        """:meth:`complete`, written with the next batch; a failure is logged. A run that
        ends before its lease was written needs only its done record: the lease is dropped
        (nobody could have read it yet)."""
        begun = self._unwritten_begins.pop(key, None)
        if begun is not None:
            _operation, args, future = self._pending[begun]
            if args[:2] == (key, token):
                self._pending[begun] = (_SKIP, args, future)
        self._queue(_COMPLETE, (key, token, retention), None)

    def _run_pending(self) -> None:
        self._flush = None
        batch, self._pending = self._pending, []
        self._unwritten_begins.clear()
        if not batch:
            return
        loop = asyncio.get_running_loop()
        if self._executor is None:
            _settle_all(batch, [(False, RuntimeError("the lease store is closed"))] * len(batch))
            return
        done = self._executor.submit(self._transaction, [(op, args) for op, args, _ in batch])

        def deliver(_: object) -> None:
            try:
                results = done.result()
            except Exception as exc:  # noqa: BLE001 - the whole batch failed (locked, disk full)
                outcomes: list[tuple[bool, Any]] = [(False, exc)] * len(batch)
            else:
                outcomes = results
            loop.call_soon_threadsafe(_settle_all, batch, outcomes)

        done.add_done_callback(deliver)

    def _transaction(
        self, operations: list[tuple[str | Callable[[sqlite3.Connection], Any], tuple[Any, ...]]]
    ) -> list[tuple[bool, Any]]:
        """Run a batch in one transaction; if it fails, each operation in its own, so that
        one bad operation fails alone."""
        db = self._db
        if db is None:
            raise RuntimeError("the lease store is not open")
        # One thread does every transaction (the executor has one worker): no lock needed.
        try:
            return self._in_transaction(db, operations)
        except sqlite3.Error:
            if len(operations) == 1:
                raise
        results: list[tuple[bool, Any]] = []
        for operation in operations:
            try:
                results += self._in_transaction(db, [operation])
            except sqlite3.Error as exc:
                results.append((False, exc))
        return results

    @staticmethod
    def _in_transaction(
        db: sqlite3.Connection,
        operations: list[tuple[str | Callable[[sqlite3.Connection], Any], tuple[Any, ...]]],
    ) -> list[tuple[bool, Any]]:
        results: list[tuple[bool, Any]] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            now = time.time()
            # The rows every message writes, one statement per kind for all of them, until an
            # operation of another kind (a lease taken with a read, a release...) needs them
            # written first; leases before done records, as they were queued.
            rows: dict[str, list[tuple[Any, ...]]] = {_BEGIN: [], _COMPLETE: []}

            def write_rows() -> None:
                for statement, queued in rows.items():
                    if queued:
                        db.execute(statement, (now, json.dumps(queued)))
                        queued.clear()

            for operation, args in operations:
                if isinstance(operation, str):
                    if operation is not _SKIP:
                        rows[operation].append(args)
                    results.append((True, None))
                else:
                    write_rows()
                    results.append((True, operation(db)))
            write_rows()
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        return results

    # -- the operations

    async def acquire(
        self, key: str, token: str, lease: float, *, marker: str | None = None
    ) -> Acquired:
        owner = token.rpartition("/")[0]
        host = self._host

        def acquire(db: sqlite3.Connection) -> Acquired:
            now = time.time()
            row = db.execute(
                "SELECT state, token, owner, expires FROM leases WHERE key = ?", (key,)
            ).fetchone()
            if row is not None:
                state, holder, holder_owner, expires = row
                alive = state == "running" and expires > now and not owner_gone(
                    holder_owner, host=host
                )
                if marker is None:
                    if state == "done":
                        return Acquired(Verdict.DONE)
                    if alive:
                        return Acquired(Verdict.RUNNING, holder)
                else:
                    if holder != marker or state != "running":
                        return Acquired(Verdict.DROP)
                    if alive:
                        return Acquired(Verdict.REDELAY)
            db.execute(
                "INSERT OR REPLACE INTO leases (key, state, token, owner, expires, updated)"
                " VALUES (?, 'running', ?, ?, ?, ?)",
                (key, token, owner, now + lease, now),
            )
            return Acquired(Verdict.RUN)

        result: Acquired = await self._submit(acquire)
        return result

    async def renew(self, leases: Sequence[tuple[str, str]], lease: float) -> None:
        if not leases:
            return

        def renew(db: sqlite3.Connection) -> None:
            now = time.time()
            db.executemany(
                "UPDATE leases SET expires = ?, updated = ?"
                " WHERE key = ? AND token = ? AND state = 'running'",
                [(now + lease, now, key, token) for key, token in leases],
            )

        await self._submit(renew)

    async def begin(self, key: str, token: str, lease: float) -> None:
        owner = token.rpartition("/")[0]
        await self._submit(_BEGIN, (key, token, owner, lease))

    async def complete(self, key: str, token: str, retention: float) -> None:
        # Done even if another run took the lease over meanwhile: this one completed.
        await self._submit(_COMPLETE, (key, token, retention))

    async def release(self, key: str, token: str) -> None:
        await self._submit(
            lambda db: db.execute("DELETE FROM leases WHERE key = ? AND token = ?", (key, token))
        )

    async def resolve(self, key: str, token: str, retention: float) -> None:
        def resolve(db: sqlite3.Connection) -> None:
            now = time.time()
            db.execute(
                "UPDATE leases SET state = 'resolved', expires = ?, updated = ?"
                " WHERE key = ? AND token = ?",
                (now + retention, now, key, token),
            )

        await self._submit(resolve)

    async def prune(self) -> int:
        def prune(db: sqlite3.Connection) -> int:
            # A running record is kept a day past its expiry: its marker may still come back.
            now = time.time()
            cursor = db.execute(
                "DELETE FROM leases WHERE (state != 'running' AND expires < ?)"
                " OR (state = 'running' AND expires < ?)",
                (now, now - 86_400),
            )
            return cursor.rowcount

        pruned: int = await self._submit(prune)
        return pruned

    async def report(self) -> StoreReport:
        def report(db: sqlite3.Connection) -> StoreReport:
            records, running, oldest = db.execute(
                "SELECT count(*), sum(state = 'running'), min(updated) FROM leases"
            ).fetchone()
            return StoreReport(self.description, records, running or 0, oldest)

        result: StoreReport = await self._submit(report)
        return result


_SKIP = "-- a lease whose run ended before it was written"
#: How long writes nobody waits for may gather before their transaction.
_WRITE_BEHIND_DELAY = 0.02

# The statements every message runs: a batch of them is one statement over a JSON array of
# the operations' arguments (?2), at the transaction's clock (?1). One step per batch, so the
# store's thread takes the interpreter's lock twice per batch, not twice per row.
_BEGIN = (
    "INSERT INTO leases (key, state, token, owner, expires, updated)"
    " SELECT j.value ->> 0, 'running', j.value ->> 1, j.value ->> 2, ?1 + (j.value ->> 3), ?1"
    " FROM json_each(?2) AS j WHERE true"
    " ON CONFLICT (key) DO UPDATE SET state = 'running', token = excluded.token,"
    " owner = excluded.owner, expires = excluded.expires, updated = excluded.updated"
    " WHERE leases.state = 'resolved'"
    " OR (leases.state = 'running' AND leases.expires < excluded.updated)"
)
_COMPLETE = (
    "INSERT INTO leases (key, state, token, owner, expires, updated)"
    " SELECT j.value ->> 0, 'done', j.value ->> 1, '', ?1 + (j.value ->> 2), ?1"
    " FROM json_each(?2) AS j WHERE true"
    " ON CONFLICT (key) DO UPDATE SET state = 'done', token = excluded.token, owner = '',"
    " expires = excluded.expires, updated = excluded.updated"
)


def _settle_all(
    batch: list[
        tuple[
            str | Callable[[sqlite3.Connection], Any], tuple[Any, ...], asyncio.Future[Any] | None
        ]
    ],
    outcomes: list[tuple[bool, Any]],
) -> None:
    failed_behind: list[BaseException] = []
    for (_operation, _args, future), (ok, value) in zip(batch, outcomes, strict=True):
        if future is None:
            if not ok:
                failed_behind.append(value)
        elif not future.done():
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
    if failed_behind:
        error = failed_behind[-1]
        log.error(  # one line: the records are an optimisation of at-least-once, not a must
            "could not write %d lease record(s) (%s: %s); those messages may run again if "
            "they come back",
            len(failed_behind),
            type(error).__name__,
            error,
        )
