"""Opening the SQLite files in ``state_dir`` that several worker processes share.

``--processes N`` starts N workers on one state directory, at the same moment. SQLite's busy
timeout covers most of their contention, but not all of it: switching a new file to WAL, or
a shared lock that would have to be upgraded while another connection waits for the same,
fails at once with "database is locked" (SQLite returns SQLITE_BUSY without calling the busy
handler where waiting could deadlock). Measured: 2 of 40 starts of four processes on a fresh
directory failed that way, and the supervisor stopped every worker over a "configuration
error". :func:`open_shared` runs the whole opening again until it gets through or the timeout
is spent.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: How long a worker waits for another process's lock on a state file, opening or writing.
BUSY_TIMEOUT = 5.0
# Between two attempts to open a file another process is setting up (milliseconds of work).
_RETRY_PAUSE = 0.01


def _locked(exc: sqlite3.OperationalError) -> bool:
    message = str(exc).lower()
    return "locked" in message or "busy" in message


def open_shared(
    path: Path,
    setup: Callable[[sqlite3.Connection], None],
    *,
    timeout: float,
    **connect: Any,
) -> sqlite3.Connection:
    """``sqlite3.connect(path, timeout=timeout, **connect)`` and ``setup(connection)`` (pragmas,
    tables), tried again while another process holds the lock, for up to ``timeout`` seconds;
    then the last error is raised. Any other error is raised at once."""
    deadline = time.monotonic() + timeout
    while True:
        db: sqlite3.Connection = sqlite3.connect(path, timeout=timeout, **connect)
        try:
            setup(db)
        except sqlite3.OperationalError as exc:
            db.close()
            if not _locked(exc) or time.monotonic() >= deadline:
                raise
        except BaseException:
            db.close()
            raise
        else:
            return db
        time.sleep(_RETRY_PAUSE)
