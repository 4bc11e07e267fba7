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
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "Acquired",
    "LeaseStore",
    "SQLiteLeaseStore",
    "StoreReport",
    "Verdict",
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
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._flush: asyncio.Handle | None = None
        self._host = socket.gethostname()
        self._lock = threading.Lock()

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
        db.execute("CREATE INDEX IF NOT EXISTS leases_expires ON leases (state, expires)")
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

    def _submit(self, operation: Callable[[sqlite3.Connection], Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((operation, future))
        if self._flush is None:
            self._flush = loop.call_soon(self._run_pending)
        return future

    def _run_pending(self) -> None:
        self._flush = None
        batch, self._pending = self._pending, []
        if not batch:
            return
        loop = asyncio.get_running_loop()
        if self._executor is None:
            for _operation, future in batch:
                if not future.done():
                    future.set_exception(RuntimeError("the lease store is closed"))
            return
        done = self._executor.submit(self._transaction, [op for op, _ in batch])

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
        self, operations: list[Callable[[sqlite3.Connection], Any]]
    ) -> list[tuple[bool, Any]]:
        db = self._db
        if db is None:
            raise RuntimeError("the lease store is not open")
        results: list[tuple[bool, Any]] = []
        with self._lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                for operation in operations:
                    db.execute("SAVEPOINT op")
                    try:
                        results.append((True, operation(db)))
                    except sqlite3.Error as exc:
                        db.execute("ROLLBACK TO op")
                        results.append((False, exc))
                    db.execute("RELEASE op")
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

    async def complete(self, key: str, token: str, retention: float) -> None:
        def complete(db: sqlite3.Connection) -> None:
            now = time.time()
            # Done even if another run took the lease over meanwhile: this one completed.
            db.execute(
                "INSERT OR REPLACE INTO leases (key, state, token, owner, expires, updated)"
                " VALUES (?, 'done', ?, '', ?, ?)",
                (key, token, now + retention, now),
            )

        await self._submit(complete)

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


def _settle_all(
    batch: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]],
    outcomes: list[tuple[bool, Any]],
) -> None:
    for (_operation, future), (ok, value) in zip(batch, outcomes, strict=True):
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
