"""Counting deliveries that never settled, for classic queues (quorum queues count them).

A message whose handler kills the process (or its connection) comes back with
``redelivered = true`` again and again; nothing on a classic queue counts that. The consumer
writes a record before it starts a redelivered message and deletes it once the message is
settled; a record that keeps growing is a crash loop. The record lives in a small SQLite file so
that it survives the crash it counts. First deliveries never touch it: no disk I/O on the hot
path.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from pathlib import Path

from ._message import Message


def default_state_dir() -> Path:
    explicit = os.environ.get("STEADYRABBIT_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "steadyrabbit"


def fingerprint(message: Message, vhost: str) -> str:
    """Identify a delivery across redeliveries: by message id if it has one, else by content."""
    digest = hashlib.sha256()
    for part in (vhost, message.queue, message.message_id or ""):
        digest.update(part.encode())
        digest.update(b"\0")
    if not message.message_id:
        digest.update(message.routing_key.encode())
        digest.update(b"\0")
        digest.update(message.body)
    return digest.hexdigest()


class CrashLog:
    """Started-but-unsettled counts of redelivered messages, keyed by :func:`fingerprint`."""

    def __init__(self, directory: Path) -> None:
        self._path = directory / "deliveries.sqlite3"
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self._path, timeout=30, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS started (key TEXT PRIMARY KEY, count INTEGER NOT NULL)"
            )
            db.commit()
            self._db = db
        return self._db

    def record_start(self, key: str) -> int:
        """Count one more start of this delivery; return how many were recorded before it."""
        with self._lock:
            db = self._connect()
            with db:
                # One statement: atomic across the worker processes sharing the file.
                (after,) = db.execute(
                    "INSERT INTO started (key, count) VALUES (?, 1) "
                    "ON CONFLICT(key) DO UPDATE SET count = count + 1 RETURNING count",
                    (key,),
                ).fetchone()
            return int(after) - 1

    def forget(self, key: str) -> None:
        with self._lock:
            db = self._connect()
            with db:
                db.execute("DELETE FROM started WHERE key = ?", (key,))

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
