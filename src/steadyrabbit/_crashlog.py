"""Counting starts of a message that never finished: crash loops.

A message whose handler kills the process (or its connection) comes back with
``redelivered = true`` again and again. The broker's own counts cannot tell that apart from
requeues of messages that never started (shutdown, aged prefetch): quorum queues count both in
``x-delivery-count``, classic queues count nothing. The consumer writes a record before it starts
a redelivered message and deletes it once the handler finished; a record that keeps growing
is a crash loop. The record lives in a small SQLite file so
that it survives the crash it counts. First deliveries never touch it: no disk I/O on the hot
path.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from time import time

from ._sqlite import BUSY_TIMEOUT, open_shared


def default_state_dir() -> Path:
    explicit = os.environ.get("STEADYRABBIT_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "steadyrabbit"


def _set_up(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    with db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS unfinished (key TEXT PRIMARY KEY, "
            "count INTEGER NOT NULL, updated REAL NOT NULL)"
        )
        db.execute("DELETE FROM unfinished WHERE updated < ?", (time() - _FORGET_AFTER,))


class CrashLog:
    """Started-but-unfinished counts of redelivered messages, keyed by :func:`fingerprint`.

    A record is written when a redelivered message starts and deleted when its handler
    finishes, whatever becomes of the ack: a handler that finished did not crash anything.
    Records nobody finished for ``_FORGET_AFTER`` seconds (their message went elsewhere) are
    dropped when the file is opened.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / "deliveries.sqlite3"
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = open_shared(
                self.path, _set_up, timeout=BUSY_TIMEOUT, check_same_thread=False
            )
        return self._db

    def check(self) -> None:
        """Open the file and write to it once: raises ``OSError``/``sqlite3.Error`` if the
        directory is unusable, so a worker can refuse to start instead of failing later."""
        with self._lock:
            db = self._connect()
            with db:
                db.execute(
                    "INSERT INTO unfinished (key, count, updated) VALUES ('', 0, ?) "
                    "ON CONFLICT(key) DO UPDATE SET updated = excluded.updated",
                    (time(),),
                )
                db.execute("DELETE FROM unfinished WHERE key = ''")

    def unfinished(self, key: str) -> int:
        """How many starts of this delivery never finished."""
        with self._lock:
            row = self._connect().execute(
                "SELECT count FROM unfinished WHERE key = ?", (key,)
            ).fetchone()
            return int(row[0]) if row else 0

    def record_start(self, key: str) -> int:
        """Count one more start of this delivery; return how many were recorded before it."""
        with self._lock:
            db = self._connect()
            with db:
                # One statement: atomic across the worker processes sharing the file.
                (after,) = db.execute(
                    "INSERT INTO unfinished (key, count, updated) VALUES (?, 1, ?) "
                    "ON CONFLICT(key) DO UPDATE SET count = count + 1, updated = excluded.updated "
                    "RETURNING count",
                    (key, time()),
                ).fetchone()
            return int(after) - 1

    def forget(self, key: str) -> None:
        with self._lock:
            db = self._connect()
            with db:
                db.execute("DELETE FROM unfinished WHERE key = ?", (key,))

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


# A record older than this belongs to a message that was settled elsewhere (another machine,
# a purge): a week is far beyond any redelivery cycle.
_FORGET_AFTER = 7 * 24 * 3600.0
# A write that waits BUSY_TIMEOUT for another process's lock counts as a failure of the log
# (logged; the message is handled without it): real writes take milliseconds.
