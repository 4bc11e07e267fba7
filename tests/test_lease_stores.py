"""The lease stores (SQLite, PostgreSQL, Redis) give the same verdicts, and the PostgreSQL inbox
records a message's key in the handler's own transaction.

PostgreSQL and Redis are the machine's (``STEADYRABBIT_TEST_POSTGRES``, default
postgresql://postgres@127.0.0.1:5432/test; ``STEADYRABBIT_TEST_REDIS``, default
redis://127.0.0.1:6379/0): when one does not answer, its tests fail, they are never skipped.
Each test has a table or key prefix of its own, removed at its end.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
import redis.asyncio

from steadyrabbit import ConfigurationError, Message
from steadyrabbit import _idempotency as idempotency_module
from steadyrabbit import _leases as leases_module
from steadyrabbit._amqp import synthetic_delivery
from steadyrabbit._idempotency import Leases, default_key, lease_store
from steadyrabbit._inbox import PostgresInbox
from steadyrabbit._leases import (
    Acquired,
    LeaseStore,
    SQLiteLeaseStore,
    Verdict,
    this_process,
)
from steadyrabbit._properties import Properties
from steadyrabbit._store_postgres import PostgresLeaseStore
from steadyrabbit._store_redis import RedisLeaseStore

pytestmark = pytest.mark.anyio

POSTGRES_URL = os.environ.get(
    "STEADYRABBIT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("STEADYRABBIT_TEST_REDIS", "redis://127.0.0.1:6379/0")

RUN = Acquired(Verdict.RUN)
DONE = Acquired(Verdict.DONE)
DROP = Acquired(Verdict.DROP)
REDELAY = Acquired(Verdict.REDELAY)


def other(n: int) -> str:
    """A run of a worker on another host: no store can check its process, only its lease."""
    return f"otherhost/1/1/{n}"


def running(holder: str) -> Acquired:
    return Acquired(Verdict.RUNNING, holder)


def dead_owner() -> str:
    """An owner on this host whose process has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return f"{socket.gethostname()}/{child.pid}/1"


# -- the stores under test -------------------------------------------------------------------


@dataclass
class Backend:
    """One store's place (a SQLite file, a PostgreSQL table, a Redis key prefix) and the open
    stores on it: ``another()`` opens one more, as another worker would."""

    kind: str
    make: Callable[[], LeaseStore]
    opened: list[LeaseStore] = field(default_factory=list)

    async def another(self) -> LeaseStore:
        store = self.make()
        try:
            await store.open()
        except Exception as exc:  # noqa: BLE001 - the service is missing: fail, never skip
            pytest.fail(
                f"{self.kind} lease store {store.description} is not usable: "
                f"{type(exc).__name__}: {exc}"
            )
        self.opened.append(store)
        return store


async def drop_table(table: str) -> None:
    async with await psycopg.AsyncConnection.connect(POSTGRES_URL, autocommit=True) as db:
        await db.execute(
            psycopg.sql.SQL("DROP TABLE IF EXISTS {}").format(psycopg.sql.Identifier(table))
        )


async def delete_prefix(prefix: str) -> None:
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        names = [name async for name in client.scan_iter(match=f"{prefix}*")]
        if names:
            await client.delete(*names)
    finally:
        await client.aclose()


@pytest.fixture(params=["sqlite", "postgres", "redis"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    kind: str = request.param
    unique = uuid.uuid4().hex[:12]
    table = f"test_leases_{unique}"
    prefix = f"steadyrabbit-test:{unique}:"
    makers: dict[str, Callable[[], LeaseStore]] = {
        "sqlite": lambda: SQLiteLeaseStore(tmp_path / "leases.sqlite3"),
        "postgres": lambda: PostgresLeaseStore(POSTGRES_URL, table=table),
        "redis": lambda: RedisLeaseStore(REDIS_URL, prefix=prefix),
    }
    place = Backend(kind, makers[kind])
    try:
        yield place
    finally:
        for store in place.opened:
            await store.close()
        if not place.opened:
            pass  # never reached the service: nothing to remove (the test failed, saying so)
        elif kind == "postgres":
            await drop_table(table)
        elif kind == "redis":
            await delete_prefix(prefix)


@pytest.fixture
async def store(backend: Backend) -> LeaseStore:
    return await backend.another()


# -- the verdicts ----------------------------------------------------------------------------


async def test_the_first_copy_runs_and_another_sees_it_running(store: LeaseStore) -> None:
    assert await store.acquire("k", other(1), 30) == RUN
    assert await store.acquire("k", other(2), 30) == running(other(1))
    assert await store.acquire("k", other(3), 30) == running(other(1))
    assert await store.acquire("unrelated", other(4), 30) == RUN


async def test_a_completed_message_is_done_for_every_later_copy(store: LeaseStore) -> None:
    await store.acquire("k", other(1), 30)
    await store.complete("k", other(1), 60)
    assert await store.acquire("k", other(2), 30) == DONE
    assert await store.acquire("k", other(3), 30) == DONE
    # The run's own marker, once it is done: dropped.
    assert await store.acquire("k", other(4), 30, marker=other(1)) == DROP


async def test_a_copy_completed_while_another_run_holds_the_lease_is_done(
    store: LeaseStore,
) -> None:
    await store.acquire("k", other(1), 30)
    await store.complete("k", other(2), 60)  # a run whose lease was taken over completed
    assert await store.acquire("k", other(3), 30) == DONE


async def test_a_released_lease_lets_the_next_copy_run(store: LeaseStore) -> None:
    await store.acquire("k", other(1), 30)
    await store.release("k", other(9))  # not its run: nothing changes
    assert await store.acquire("k", other(2), 30) == running(other(1))
    await store.release("k", other(1))
    assert await store.acquire("k", other(3), 30) == RUN
    assert await store.acquire("k", other(4), 30) == running(other(3))


async def test_a_resolved_run_lets_a_new_copy_run_but_drops_its_marker(store: LeaseStore) -> None:
    await store.acquire("k", other(1), 30)
    await store.resolve("k", other(1), 60)
    assert await store.acquire("k", other(2), 30, marker=other(1)) == DROP
    assert await store.acquire("k", other(3), 30) == RUN
    assert await store.acquire("k", other(4), 30, marker=other(1)) == DROP
    assert await store.acquire("k", other(5), 30) == running(other(3))


async def test_the_marker_of_a_live_run_is_delayed_again(store: LeaseStore) -> None:
    await store.acquire("k", other(1), 30)
    assert await store.acquire("k", other(2), 30, marker=other(1)) == REDELAY
    assert await store.acquire("k", other(3), 30) == running(other(1))


async def test_the_marker_of_an_expired_run_takes_the_job_over(store: LeaseStore) -> None:
    await store.acquire("k", other(1), 0.2)
    await asyncio.sleep(0.3)
    assert await store.acquire("k", other(2), 30, marker=other(1)) == RUN
    assert await store.acquire("k", other(3), 30) == running(other(2))
    # The old marker comes back once more: its run is no longer the holder.
    assert await store.acquire("k", other(4), 30, marker=other(1)) == DROP


async def test_a_copy_takes_over_an_expired_lease(store: LeaseStore) -> None:
    await store.acquire("k", other(1), 0.2)
    await asyncio.sleep(0.3)
    assert await store.acquire("k", other(2), 30) == RUN
    assert await store.acquire("k", other(3), 30) == running(other(2))


async def test_a_marker_for_another_run_is_dropped(store: LeaseStore) -> None:
    await store.acquire("k", other(1), 30)
    assert await store.acquire("k", other(2), 30, marker="otherhost/9/9/9") == DROP
    assert await store.acquire("k", other(3), 30) == running(other(1))


async def test_a_marker_without_a_record_runs(store: LeaseStore) -> None:
    assert await store.acquire("k", other(2), 30, marker=other(1)) == RUN
    assert await store.acquire("k", other(3), 30) == running(other(2))


async def test_a_run_of_a_live_process_of_this_host_holds_its_lease(store: LeaseStore) -> None:
    mine = f"{this_process()}/1"
    await store.acquire("k", mine, 30)
    assert await store.acquire("k", other(2), 30) == running(mine)
    assert await store.acquire("k", other(3), 30, marker=mine) == REDELAY


async def test_a_run_of_a_gone_process_of_this_host_is_taken_over_at_once(
    store: LeaseStore,
) -> None:
    gone = dead_owner()
    await store.acquire("copy", f"{gone}/1", 30)
    assert await store.acquire("copy", other(2), 30) == RUN
    assert await store.acquire("copy", other(3), 30) == running(other(2))
    await store.acquire("marker", f"{gone}/2", 30)
    assert await store.acquire("marker", other(4), 30, marker=f"{gone}/2") == RUN
    assert await store.acquire("marker", other(5), 30) == running(other(4))


async def test_renewals_keep_leases_alive_past_their_first_expiry(store: LeaseStore) -> None:
    for key, token in (("a", other(1)), ("b", other(2)), ("c", other(3))):
        await store.acquire(key, token, 0.5)
    started = time.monotonic()
    while time.monotonic() - started < 0.8:
        await asyncio.sleep(0.1)
        # Several at once; "c" with a token that is not its run's, and "x" that has no record.
        await store.renew([("a", other(1)), ("b", other(2)), ("c", other(9)), ("x", other(8))], 0.5)
    assert await store.acquire("a", other(4), 30) == running(other(1))
    assert await store.acquire("b", other(5), 30) == running(other(2))
    assert await store.acquire("c", other(6), 30) == RUN
    assert await store.acquire("x", other(7), 30) == RUN
    await store.renew([], 30)  # nothing to renew: nothing done


async def test_renewing_a_completed_run_leaves_it_done(store: LeaseStore) -> None:
    await store.acquire("k", other(1), 30)
    await store.complete("k", other(1), 60)
    await store.renew([("k", other(1))], 30)
    assert await store.acquire("k", other(2), 30) == DONE


async def test_prune_removes_records_past_retention_and_keeps_running_ones(
    backend: Backend, store: LeaseStore
) -> None:
    for key in ("done", "resolved", "expired run", "live run"):
        await store.acquire(key, other(1), 30 if key == "live run" else 0.2)
    await store.complete("done", other(1), 0.2)
    await store.resolve("resolved", other(1), 0.2)
    await store.complete("kept", other(1), 60)
    await asyncio.sleep(0.4)
    pruned = await store.prune()
    # Redis deletes records itself (their TTL); the others when pruned.
    assert pruned == (0 if backend.kind == "redis" else 2)
    report = await store.report()
    assert (report.records, report.running) == (3, 2)
    assert await store.acquire("done", other(2), 30) == RUN
    assert await store.acquire("resolved", other(3), 30, marker=other(1)) == RUN
    # The expired run's record stays (a day past its expiry), so a marker still finds it.
    assert await store.acquire("expired run", other(4), 30, marker=other(9)) == DROP
    assert await store.acquire("live run", other(5), 30) == running(other(1))
    assert await store.acquire("kept", other(6), 30) == DONE


async def test_report_counts_the_records(store: LeaseStore) -> None:
    empty = await store.report()
    assert (empty.records, empty.running, empty.oldest) == (0, 0, None)
    assert empty.store == store.description
    before = time.time()
    for n in range(3):
        await store.acquire(f"run {n}", other(n), 30)
    await store.acquire("done", other(7), 30)
    await store.complete("done", other(7), 60)
    await store.acquire("resolved", other(8), 30)
    await store.resolve("resolved", other(8), 60)
    report = await store.report()
    assert (report.records, report.running) == (5, 3)
    assert report.oldest is not None
    # The database's clock is this machine's here, give or take a second.
    assert before - 1 <= report.oldest <= time.time() + 1


async def test_concurrent_copies_of_one_message_run_once(backend: Backend) -> None:
    stores = [await backend.another() for _ in range(4)]  # four workers
    tokens = [other(n) for n in range(20)]
    verdicts = await asyncio.gather(
        *(stores[n % 4].acquire("k", token, 30) for n, token in enumerate(tokens))
    )
    winners = [token for token, got in zip(tokens, verdicts, strict=True) if got == RUN]
    assert len(winners) == 1, verdicts
    assert sorted(verdicts, key=str) == sorted([RUN] + [running(winners[0])] * 19, key=str)


async def test_concurrent_markers_of_a_dead_run_take_it_over_once(backend: Backend) -> None:
    stores = [await backend.another() for _ in range(4)]
    await stores[0].acquire("k", other(100), 0.1)
    await asyncio.sleep(0.2)
    verdicts = await asyncio.gather(
        *(stores[n % 4].acquire("k", other(n), 30, marker=other(100)) for n in range(20))
    )
    assert verdicts.count(RUN) == 1, verdicts
    assert verdicts.count(DROP) == 19, verdicts


# -- construction ----------------------------------------------------------------------------


def test_descriptions_hide_the_password() -> None:
    stores: list[Any] = [
        PostgresLeaseStore("postgresql://app:s3cr3t-pw@db.example:5432/jobs"),
        RedisLeaseStore("redis://:s3cr3t-pw@cache.example:6379/0"),
    ]
    for made in stores:
        assert "s3cr3t-pw" not in made.description
        assert "example" in made.description


def test_lease_store_picks_the_store_by_url(tmp_path: Path) -> None:
    assert isinstance(lease_store(None, tmp_path), SQLiteLeaseStore)
    assert isinstance(lease_store(POSTGRES_URL, tmp_path), PostgresLeaseStore)
    assert isinstance(lease_store("postgres://u@h/d", tmp_path), PostgresLeaseStore)
    assert isinstance(lease_store(REDIS_URL, tmp_path), RedisLeaseStore)


def test_a_url_redis_cannot_read_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="Redis lease store"):
        RedisLeaseStore("mysql://u:pw@h/d")


def test_a_table_name_that_is_not_one_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="not a table name"):
        PostgresLeaseStore(POSTGRES_URL, table="a.b.c")
    with pytest.raises(ConfigurationError, match="not a table name"):
        PostgresInbox("")


@pytest.mark.parametrize(
    ("modules", "make", "extra"),
    [
        (("psycopg",), lambda: PostgresLeaseStore(POSTGRES_URL), "postgres"),
        (("psycopg_pool",), lambda: PostgresLeaseStore(POSTGRES_URL), "postgres"),
        (("psycopg",), PostgresInbox, "postgres"),
        (("redis", "redis.asyncio"), lambda: RedisLeaseStore(REDIS_URL), "redis"),
    ],
)
def test_a_missing_driver_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
    modules: tuple[str, ...],
    make: Callable[[], object],
    extra: str,
) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # "import module" raises ImportError
    with pytest.raises(ConfigurationError) as raised:
        make()
    assert str(raised.value).endswith(f"pip install 'steadyrabbit[{extra}]'")


def test_importing_steadyrabbit_imports_no_database_driver() -> None:
    probe = (
        "import sys, steadyrabbit, steadyrabbit._leases\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('psycopg', 'redis')))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "[]"


# -- the inbox -------------------------------------------------------------------------------


def make_message(
    body: bytes = b'{"order": 1}', *, message_id: str | None = "m-1", queue: str = "orders"
) -> Message:
    deliver, wire = synthetic_delivery(
        Properties(headers={}, message_id=message_id),
        delivery_tag=1,
        redelivered=False,
        exchange="",
        routing_key=queue,
    )
    return Message(None, deliver, wire, body, queue)  # type: ignore[arg-type]


@pytest.fixture
def inbox_table() -> Iterator[str]:
    table = f"test_inbox_{uuid.uuid4().hex[:12]}"
    try:
        yield table
    finally:
        try:
            db = psycopg.connect(POSTGRES_URL, autocommit=True)
        except psycopg.OperationalError:
            pass  # never reached the database: nothing to remove (the test failed, saying so)
        else:
            with db:
                for name in (table, f"{table}_effects"):
                    db.execute(
                        psycopg.sql.SQL("DROP TABLE IF EXISTS {}").format(
                            psycopg.sql.Identifier(name)
                        )
                    )


@pytest.fixture
async def db(inbox_table: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A connection of the handler's own (not autocommit), with the inbox table and a table of
    the handler's effects."""
    try:
        connection = await psycopg.AsyncConnection.connect(POSTGRES_URL)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {POSTGRES_URL} is not reachable: {exc}")
    async with connection:
        await PostgresInbox(inbox_table).create_table(connection)
        await PostgresInbox(inbox_table).create_table(connection)  # again: nothing happens
        await connection.execute(f"CREATE TABLE {inbox_table}_effects (n int)")
        await connection.commit()
        yield connection


async def effects(db: psycopg.AsyncConnection[Any], table: str) -> int:
    cursor = await db.execute(f"SELECT count(*) FROM {table}_effects")
    row = await cursor.fetchone()
    await db.commit()
    assert row is not None
    return int(row[0])


async def test_the_inbox_lets_the_first_copy_through_and_stops_the_next(
    db: psycopg.AsyncConnection[Any], inbox_table: str
) -> None:
    inbox = PostgresInbox(inbox_table)

    async def handle(message: Message) -> None:
        async with db.transaction():
            if not await inbox.receive(db, message):
                return
            await db.execute(f"INSERT INTO {inbox_table}_effects VALUES (1)")

    await handle(make_message())
    await handle(make_message())  # redelivered after the commit: no effects
    await handle(make_message(b"another body"))  # a producer reusing the id: a new message
    await handle(make_message(queue="invoices"))  # another queue: a new message
    assert await effects(db, inbox_table) == 3


async def test_the_key_rolls_back_with_the_handlers_writes(
    db: psycopg.AsyncConnection[Any], inbox_table: str
) -> None:
    inbox = PostgresInbox(inbox_table)

    class Crash(Exception):
        pass

    async def failing_handler(message: Message) -> None:
        async with db.transaction():
            assert await inbox.receive(db, message) is True
            await db.execute(f"INSERT INTO {inbox_table}_effects VALUES (1)")
            raise Crash  # the handler failed before its commit

    with pytest.raises(Crash):
        await failing_handler(make_message())
    async with db.transaction():
        assert await inbox.receive(db, make_message()) is True  # so the next copy runs
    async with db.transaction():
        assert await inbox.receive(db, make_message()) is False
    assert await effects(db, inbox_table) == 0


async def test_receive_in_the_connections_implicit_transaction(
    db: psycopg.AsyncConnection[Any], inbox_table: str
) -> None:
    inbox = PostgresInbox(inbox_table)
    assert await inbox.receive(db, make_message()) is True
    await db.rollback()
    assert await inbox.receive(db, make_message()) is True
    await db.commit()
    assert await inbox.receive(db, make_message()) is False
    await db.rollback()


async def test_a_copy_handled_meanwhile_waits_for_the_first_ones_transaction(
    db: psycopg.AsyncConnection[Any], inbox_table: str
) -> None:
    inbox = PostgresInbox(inbox_table)
    async with await psycopg.AsyncConnection.connect(POSTGRES_URL) as second:
        assert await inbox.receive(db, make_message()) is True
        copy = asyncio.ensure_future(inbox.receive(second, make_message()))
        await asyncio.sleep(0.2)
        assert not copy.done()  # it waits on the first transaction's key
        await db.commit()
        assert await copy is False
        await second.rollback()


async def test_a_message_without_message_id_needs_a_key(
    db: psycopg.AsyncConnection[Any], inbox_table: str
) -> None:
    inbox = PostgresInbox(inbox_table)
    with pytest.raises(ConfigurationError, match="has no message_id"):
        await inbox.receive(db, make_message(message_id=None))
    assert await inbox.receive(db, make_message(message_id=None), key="order-17") is True
    await db.commit()
    assert await inbox.receive(db, make_message(message_id=None), key="order-17") is False
    await db.rollback()


async def test_the_inbox_refuses_an_autocommit_connection_outside_a_transaction(
    inbox_table: str,
) -> None:
    inbox = PostgresInbox(inbox_table)
    async with await psycopg.AsyncConnection.connect(POSTGRES_URL, autocommit=True) as db:
        await inbox.create_table(db)
        with pytest.raises(ConfigurationError, match="transaction"):
            await inbox.receive(db, make_message())
        async with db.transaction():
            assert await inbox.receive(db, make_message()) is True


def test_the_default_key_digests_vhost_queue_message_id_and_body() -> None:
    message = make_message(b"body", message_id="id-1", queue="q")
    assert PostgresInbox().key(message) == hashlib.sha256(b"/\0q\0id-1\0body").hexdigest()[:32]
    assert PostgresInbox(vhost="prod").key(message) != PostgresInbox().key(message)


async def test_prune_deletes_old_keys(db: psycopg.AsyncConnection[Any], inbox_table: str) -> None:
    inbox = PostgresInbox(inbox_table)
    await inbox.receive(db, make_message())
    await db.commit()
    assert await inbox.prune(db, 3600) == 0
    await asyncio.sleep(0.05)
    assert await inbox.prune(db, 0.01) == 1
    assert await inbox.receive(db, make_message()) is True
    await db.rollback()


def test_the_sync_twins(inbox_table: str) -> None:
    inbox = PostgresInbox(inbox_table)
    try:
        db = psycopg.connect(POSTGRES_URL)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {POSTGRES_URL} is not reachable: {exc}")
    with db:
        inbox.create_table_sync(db)
        inbox.create_table_sync(db)
        with db.transaction():
            assert inbox.receive_sync(db, make_message()) is True
            assert inbox.receive_sync(db, make_message(b"other")) is True
        with db.transaction():
            assert inbox.receive_sync(db, make_message()) is False
        assert inbox.receive_sync(db, make_message(b"third")) is True
        db.rollback()
        assert inbox.receive_sync(db, make_message(b"third")) is True
        db.commit()
        with pytest.raises(ConfigurationError, match="has no message_id"):
            inbox.receive_sync(db, make_message(message_id=None))
        db.rollback()
        assert inbox.prune_sync(db, 3600) == 0
        time.sleep(0.05)
        assert inbox.prune_sync(db, 0.01) == 3
    with (
        psycopg.connect(POSTGRES_URL, autocommit=True) as auto,
        pytest.raises(ConfigurationError, match="transaction"),
    ):
        inbox.receive_sync(auto, make_message())


# -- the embedded store's writes behind messages, and the Leases fast path -------------------


def sqlite_rows(path: Path) -> dict[str, tuple[str, str]]:
    """The records in a SQLite store's file, read by another connection: key -> (state, token)."""
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT key, state, token FROM leases")
        return {key: (state, token) for key, state, token in rows}
    finally:
        db.close()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SQLiteLeaseStore]:
    store = SQLiteLeaseStore(tmp_path / "leases.sqlite3")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def test_a_run_that_ends_before_its_lease_is_written_costs_one_row(
    sqlite_store: SQLiteLeaseStore,
) -> None:
    """The lease of a run that completed before the batch was written is never written; a
    run still going has its lease written, and a waited operation queued after both sees
    them (one transaction, in order)."""
    mine = this_process()
    sqlite_store.queue_begin("short", f"{mine}/1", 30.0)
    sqlite_store.queue_begin("long", f"{mine}/2", 30.0)
    sqlite_store.queue_complete("short", f"{mine}/1", 3600.0)
    assert await sqlite_store.acquire("short", other(1), 30.0) == DONE
    assert await sqlite_store.acquire("long", other(2), 30.0) == running(f"{mine}/2")
    report = await sqlite_store.report()
    assert (report.records, report.running) == (2, 1)


async def test_writes_behind_wait_for_their_batch_unless_written_now(
    sqlite_store: SQLiteLeaseStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(leases_module, "_WRITE_BEHIND_DELAY", 60.0)
    sqlite_store.queue_complete("k", f"{this_process()}/1", 3600.0)
    await asyncio.sleep(0.2)
    assert sqlite_rows(sqlite_store.path) == {}
    sqlite_store.write_now()
    await eventually_true(lambda: "k" in sqlite_rows(sqlite_store.path))
    assert sqlite_rows(sqlite_store.path)["k"] == ("done", f"{this_process()}/1")


async def test_rows_written_behind_that_fail_are_logged_and_a_waited_operation_still_runs(
    sqlite_store: SQLiteLeaseStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A batch that fails is written again item by item: the rows that fail alone are logged
    in one line with their number, the waited operation and the rows beside them land."""
    failing = sqlite3.OperationalError("disk I/O error")
    real = SQLiteLeaseStore._in_transaction

    def in_transaction(db: sqlite3.Connection, batch: list[Any]) -> list[tuple[bool, Any]]:
        for item in batch:
            if type(item) is not tuple and any(row and row[0] == "a" for row in item.begins):
                raise failing
        return real(db, batch)

    monkeypatch.setattr(SQLiteLeaseStore, "_in_transaction", staticmethod(in_transaction))
    caplog.set_level(logging.ERROR, logger="steadyrabbit")
    mine = this_process()
    sqlite_store.queue_begin("a", f"{mine}/1", 30.0)
    sqlite_store.queue_complete("b", f"{mine}/2", 3600.0)
    acquired = asyncio.ensure_future(sqlite_store.acquire("c", f"{mine}/3", 30.0))
    await asyncio.sleep(0)  # queued: the rows after it are another segment of the batch
    sqlite_store.queue_complete("d", f"{mine}/4", 3600.0)
    assert await acquired == RUN
    await eventually_true(lambda: "could not write 2 lease record(s)" in caplog.text)
    assert "disk I/O error" in caplog.text
    await eventually_true(lambda: set(sqlite_rows(sqlite_store.path)) == {"c", "d"})


async def eventually_true(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.01)


@dataclass
class Recorded:
    """A store that records what Leases writes behind (and answers no waited operation)."""

    description: str = "recorded"
    begins: list[tuple[str, str]] = field(default_factory=list)
    completes: list[tuple[str, str]] = field(default_factory=list)
    written_now: int = 0

    def queue_begin(self, key: str, token: str, lease: float) -> None:
        self.begins.append((key, token))

    def queue_complete(self, key: str, token: str, retention: float) -> None:
        self.completes.append((key, token))

    def write_now(self) -> None:
        self.written_now += 1


def recorded_leases(store: Recorded, keys: dict[str, Any] | None = None) -> Leases:
    consumer = SimpleNamespace(counts=SimpleNamespace(duplicates=0, markers=0), handoff_after=None)
    return Leases(
        store,  # type: ignore[arg-type]
        owner="host/1/1",
        vhost="/",
        consumers={"orders": consumer},
        keys={"orders": None} if keys is None else keys,
        lease=30.0,
        retention=3600.0,
    )


async def run_through(leases: Leases, message: Message) -> list[bytes]:
    ran: list[bytes] = []

    async def handler(message: Message) -> None:
        ran.append(message.body)

    await leases.around_handler(message, handler)
    return ran


async def test_a_first_delivery_is_keyed_by_the_default_key_and_written_behind() -> None:
    store = Recorded()
    leases = recorded_leases(store)
    message = make_message(b"body", message_id="id-1", queue="orders")
    assert await run_through(leases, message) == [b"body"]
    key = default_key(message, "/")
    assert store.begins == [(key, "host/1/1/1")]
    assert store.completes == [(key, "host/1/1/1")]
    assert message.lease is None
    # A copy of it is answered from memory: not run, nothing written, counted.
    assert await run_through(leases, make_message(b"body", message_id="id-1")) == []
    assert len(store.completes) == 1
    assert leases._consumers["orders"].counts.duplicates == 1
    # Another queue, a message without an id, a key function that says None: not keyed.
    assert await run_through(leases, make_message(queue="other")) == [b'{"order": 1}']
    assert await run_through(leases, make_message(message_id=None)) == [b'{"order": 1}']
    by_body = recorded_leases(store, {"orders": lambda m: None})
    assert await run_through(by_body, make_message()) == [b'{"order": 1}']
    assert len(store.begins) == 1


async def test_a_worker_remembers_at_least_its_latest_completions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(idempotency_module, "_REMEMBERED_DONE", 3)
    store = Recorded()
    leases = recorded_leases(store)
    for n in range(5):
        await run_through(leases, make_message(message_id=f"id-{n}"))
    # The last 3 at least: a copy of each is acked without running.
    for n in (2, 3, 4):
        assert await run_through(leases, make_message(message_id=f"id-{n}")) == []
    for n in range(5, 7):
        await run_through(leases, make_message(message_id=f"id-{n}"))
    # id-0..id-2 went with the older generation: only the store could tell now, and this
    # store says nothing, so the first delivery of a copy runs (a real store reads it).
    assert await run_through(leases, make_message(message_id="id-0")) == [b'{"order": 1}']
    for n in (4, 5, 6):
        assert await run_through(leases, make_message(message_id=f"id-{n}")) == []


async def test_a_lost_connection_or_channel_writes_what_is_held_back_at_once() -> None:
    store = Recorded()
    leases = recorded_leases(store)
    leases.on_channel_lost("orders", RuntimeError("closed"))
    leases.on_reconnecting("consume", "connection_lost", RuntimeError("reset"))
    assert store.written_now == 2
