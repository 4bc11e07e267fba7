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

from ._sqlite import BUSY_TIMEOUT, open_shared

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
    done record) without the caller waiting: an embedded one whose writes land in a batch a
    few milliseconds later."""

    def queue_begin(self, key: str, token: str, lease: float) -> None: ...

    def queue_complete(self, key: str, token: str, retention: float) -> None: ...

    def write_now(self) -> None:
        """Start writing what is queued now, not when the batch's delay is up."""
        ...


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


class _Rows:
    """Rows written behind messages between two waited operations: leases (key, token,
    lease; None: dropped, its run ended first) and done records (key, token, retention),
    each kind written by one statement."""

    __slots__ = ("begins", "begun", "completes")

    def __init__(self) -> None:
        self.begins: list[tuple[str, str, float] | None] = []
        # The index of each key's lease in begins, so that a run that ends before the batch
        # is written costs one row, not two.
        self.begun: dict[str, int] = {}
        self.completes: list[tuple[str, str, float]] = []

    def count(self) -> int:
        return len(self.begins) - self.begins.count(None) + len(self.completes)


#: A waited operation: a function of the connection, and the future of its result.
_Waited = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]"]


# -- SQLite: one host ----------------------------------------------------------------------------


def _set_up(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA journal_mode=WAL")
    # A done record lost to a power cut costs at most a duplicate run; a fsync per
    # transaction would cost every message.
    db.execute("PRAGMA synchronous=NORMAL")
    # A batch's statement writes many rows, so SQLite journals the pages it changes to be
    # able to undo that statement alone; in a temporary file, that journal cost a third of
    # the store's time per row (measured), in memory it is a copy of each page.
    db.execute("PRAGMA temp_store=MEMORY")
    db.execute(
        "CREATE TABLE IF NOT EXISTS leases ("
        " key TEXT PRIMARY KEY, state TEXT NOT NULL, token TEXT NOT NULL,"
        " owner TEXT NOT NULL, expires REAL NOT NULL, updated REAL NOT NULL)"
    )
    # No index beside the key: every message writes its row twice, and the hourly prune
    # can afford a scan.
    db.execute("DROP INDEX IF EXISTS leases_expires")


class SQLiteLeaseStore:
    """Leases and done records in a SQLite file (WAL), for the workers of one host.

    The operations waited for in one event-loop turn go to the database in one transaction,
    on one thread; the rows written behind messages gather for up to
    :data:`_WRITE_BEHIND_DELAY` and join the next transaction: a thousand messages cost one
    commit, not two each.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"sqlite:{path}"
        self._db: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        # What the next transaction writes, in order: waited operations, and between them the
        # rows written behind messages (the last of those segments is _rows, which new rows
        # join; None once an operation was queued after it).
        self._pending: list[_Rows | _Waited] = []
        self._rows: _Rows | None = None
        self._flush: asyncio.Handle | asyncio.TimerHandle | None = None
        self._flush_later = False
        self._host = socket.gethostname()

    # -- lifecycle

    async def open(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="steadyrabbit-leases")
        await asyncio.get_running_loop().run_in_executor(self._executor, self._connect)

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = open_shared(
            self.path,
            _set_up,
            timeout=BUSY_TIMEOUT,
            isolation_level=None,
            check_same_thread=False,
        )

    async def close(self) -> None:
        self.write_now()
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.get_running_loop().run_in_executor(executor, self._disconnect)
            executor.shutdown(wait=True)

    def _disconnect(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- batching: many operations in one transaction

    def _submit(self, operation: Callable[[sqlite3.Connection], Any]) -> asyncio.Future[Any]:
        """Queue ``operation`` (a function of the connection) for this loop turn's
        transaction, after the rows written behind so far."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((operation, future))
        self._rows = None  # rows queued from now on are written after this operation
        if self._flush is not None and self._flush_later:
            self._flush.cancel()
            self._flush = None
        if self._flush is None:
            self._flush_later = False
            self._flush = loop.call_soon(self._run_pending)
        return future

    def _behind(self) -> _Rows:
        """The segment that rows written behind join, started if need be."""
        rows = self._rows
        if rows is None:
            rows = self._rows = _Rows()
            self._pending.append(rows)
            if self._flush is None:
                # Nobody waits for a write behind: gather them into one transaction (a commit
                # per turn would cost more than the rows).
                self._flush_later = True
                self._flush = asyncio.get_running_loop().call_later(
                    _WRITE_BEHIND_DELAY, self._run_pending
                )
        return rows

    # -- write-behind: what every message writes, queued and not waited for

    def queue_begin(self, key: str, token: str, lease: float) -> None:
        """:meth:`begin`, written with the next batch; a failure is logged."""
        rows = self._behind()
        rows.begun[key] = len(rows.begins)
        rows.begins.append((key, token, lease))

    def queue_complete(self, key: str, token: str, retention: float) -> None:
        """:meth:`complete`, written with the next batch; a failure is logged. A run that
        ends before its lease was written needs only its done record: the lease is dropped
        (nobody could have read it yet)."""
        rows = self._behind()
        begun = rows.begun.pop(key, None)
        if begun is not None:
            row = rows.begins[begun]
            if row is not None and row[1] == token:
                rows.begins[begun] = None
        rows.completes.append((key, token, retention))

    def write_now(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._run_pending()

    def _run_pending(self) -> None:
        self._flush = None
        batch, self._pending = self._pending, []
        self._rows = None
        if not batch:
            return
        if self._executor is None:
            _settle(batch, None, _rows_in(batch), RuntimeError("the lease store is closed"))
            return
        self._executor.submit(self._write, batch, asyncio.get_running_loop())

    def _write(self, batch: list[_Rows | _Waited], loop: asyncio.AbstractEventLoop) -> None:
        """On the store's thread: write ``batch``, then hand the outcomes back to the loop. A
        batch of rows alone that landed needs no word back: no loop wake-up."""
        outcomes: list[tuple[bool, Any]] | None
        try:
            outcomes, lost, error = self._transaction(batch)
        except Exception as exc:  # noqa: BLE001 - the whole batch failed (locked, disk full)
            outcomes, lost, error = None, _rows_in(batch), exc
        if outcomes is None or lost or any(type(item) is tuple for item in batch):
            loop.call_soon_threadsafe(_settle, batch, outcomes, lost, error)

    def _transaction(
        self, batch: list[_Rows | _Waited]
    ) -> tuple[list[tuple[bool, Any]], int, BaseException | None]:
        """Run a batch in one transaction; if it fails, each item in its own, so that one bad
        operation fails alone. Returns the waited operations' outcomes, in order, how many
        rows written behind could not be written, and why."""
        db = self._db
        if db is None:
            raise RuntimeError("the lease store is not open")
        # One thread does every transaction (the executor has one worker): no lock needed.
        try:
            return self._in_transaction(db, batch), 0, None
        except sqlite3.Error:
            if len(batch) == 1:
                raise
        outcomes: list[tuple[bool, Any]] = []
        lost = 0
        rows_error: BaseException | None = None
        for item in batch:
            try:
                outcomes += self._in_transaction(db, [item])
            except sqlite3.Error as exc:
                if isinstance(item, _Rows):
                    lost += item.count()
                    rows_error = exc
                else:
                    outcomes.append((False, exc))
        return outcomes, lost, rows_error

    @staticmethod
    def _in_transaction(
        db: sqlite3.Connection, batch: list[_Rows | _Waited]
    ) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            now = time.time()
            for item in batch:
                if type(item) is tuple:
                    outcomes.append((True, item[0](db)))
                    continue
                # The rows every message writes, one statement per kind for all of them;
                # leases before done records, as they were queued.
                assert isinstance(item, _Rows)
                # The owner is the token's prefix, taken here for the rows still written.
                begins = [
                    (key, token, token.rpartition("/")[0], lease)
                    for key, token, lease in filter(None, item.begins)
                ]
                if begins:
                    db.execute(_BEGIN, (now, json.dumps(begins)))
                if item.completes:
                    db.execute(_COMPLETE, (now, json.dumps(item.completes)))
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        return outcomes

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
        row = [key, token, token.rpartition("/")[0], lease]
        await self._submit(lambda db: db.execute(_BEGIN, (time.time(), json.dumps([row]))))

    async def complete(self, key: str, token: str, retention: float) -> None:
        # Done even if another run took the lease over meanwhile: this one completed.
        row = [key, token, retention]
        await self._submit(lambda db: db.execute(_COMPLETE, (time.time(), json.dumps([row]))))

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


#: How long writes nobody waits for may gather before their transaction. Each transaction
#: rewrites every page its rows touch, and done records land on random pages of the key
#: index, so fewer, larger batches cost less per row (measured at W1's 10,000 messages a
#: second: 15 us per row at 20 ms, 8 us at 100 ms). A record matters to a copy of its
#: message, which comes back only if the broker lost the ack (sent in the turn the run
#: ended, long before any batch), and when a connection or channel is lost the middleware
#: has the batch written at once (``write_now``).
_WRITE_BEHIND_DELAY = 0.1

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


def _rows_in(batch: list[_Rows | _Waited]) -> int:
    return sum(item.count() for item in batch if isinstance(item, _Rows))


def _settle(
    batch: list[_Rows | _Waited],
    outcomes: list[tuple[bool, Any]] | None,
    lost: int,
    error: BaseException | None,
) -> None:
    """On the loop: settle the waited operations of ``batch`` by their ``outcomes`` (None:
    all failed with ``error``), and log the ``lost`` rows written behind that ``error`` kept
    out."""
    futures = [item[1] for item in batch if type(item) is tuple]
    if outcomes is None:
        assert error is not None
        outcomes = [(False, error)] * len(futures)
    for future, (ok, value) in zip(futures, outcomes, strict=True):
        if not future.done():
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
    if lost:
        log.error(  # one line: the records are an optimisation of at-least-once, not a must
            "could not write %d lease record(s) (%s: %s); those messages may run again if "
            "they come back",
            lost,
            type(error).__name__,
            error,
        )
