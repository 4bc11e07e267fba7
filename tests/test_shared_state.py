"""Worker processes started together on one state directory (``--processes N``) all open its
SQLite files: the crash log and the lease store. SQLite fails some of those openings at once
with "database is locked" instead of waiting (switching a new file to WAL); before
``_sqlite.open_shared`` about one start in twenty of four processes failed so, and the
supervisor stopped every worker over a "configuration error"."""

from __future__ import annotations

import asyncio
import multiprocessing
import tempfile
from multiprocessing.synchronize import Barrier
from pathlib import Path

from steadyrabbit._crashlog import CrashLog
from steadyrabbit._leases import SQLiteLeaseStore

PROCESSES, STARTS = 4, 40


def _open_both(directory: str, barrier: Barrier, results: multiprocessing.Queue[str]) -> None:
    async def open_store() -> None:
        store = SQLiteLeaseStore(Path(directory) / "leases.sqlite3")
        await store.open()
        await store.close()

    barrier.wait()
    try:
        CrashLog(Path(directory)).check()
        asyncio.run(open_store())
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put(repr(exc))
    else:
        results.put("ok")


def test_processes_started_together_all_open_the_state_directory() -> None:
    context = multiprocessing.get_context("fork")
    failures: list[str] = []
    for _ in range(STARTS):
        with tempfile.TemporaryDirectory(prefix="steadyrabbit-shared-") as directory:
            barrier = context.Barrier(PROCESSES)
            results: multiprocessing.Queue[str] = context.Queue()
            processes = [
                context.Process(target=_open_both, args=(directory, barrier, results))
                for _ in range(PROCESSES)
            ]
            for process in processes:
                process.start()
            outcomes = [results.get(timeout=30) for _ in processes]
            for process in processes:
                process.join(timeout=30)
            failures += [outcome for outcome in outcomes if outcome != "ok"]
    assert failures == []
