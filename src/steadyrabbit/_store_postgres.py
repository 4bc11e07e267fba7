"""Leases and done records in PostgreSQL, shared by the workers of many hosts.

The records and verdicts are those of :class:`._leases.SQLiteLeaseStore`; only where they live
differs. Every time is the database's (``now()``), never a host's, since hosts' clocks differ.

Taking a lease is one ``INSERT ... ON CONFLICT (key) DO UPDATE ... WHERE <it may be taken>
RETURNING``: atomic across hosts (the conflicting row is locked while its condition is checked),
and one round trip for a new message, which is the common case. When nothing comes back, the
record is read to say why (done, running, a marker to drop or delay). A run held by a process
of this host that no longer exists is taken over at once, by the same statement naming that
run's token as dead (a compare-and-set on it); a run of another host must let its lease expire.

psycopg 3 (``pip install 'steadyrabbit[postgres]'``) is imported when a store is made, never
on ``import steadyrabbit``.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from ._errors import ConfigurationError
from ._leases import Acquired, StoreReport, Verdict, owner_gone
from ._url import mask_url

if TYPE_CHECKING:
    from psycopg import AsyncConnection, sql
    from psycopg_pool import AsyncConnectionPool

__all__ = ["PostgresLeaseStore"]

#: A running record is kept this long past its expiry: its marker may still come back.
_KEEP_RUNNING = 86_400.0
#: Rounds of "take it, else read why" before giving up: each extra round means the record
#: changed between the two statements, which a busy key does now and then, never for long.
_ROUNDS = 8

_NOW = "(SELECT extract(epoch FROM now())::float8 AS now) AS n"


def require_psycopg(what: str, *, pool: bool = False) -> None:
    """Raise a ConfigurationError that says how to install psycopg 3 (and psycopg_pool, with
    ``pool``) if it is missing."""
    try:
        import psycopg  # noqa: F401 - only checked here

        if pool:
            import psycopg_pool  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            f"{what} needs psycopg 3, which is not installed: pip install 'steadyrabbit[postgres]'"
        ) from None


def table_identifier(table: str) -> sql.Identifier:
    """``table``, or ``schema.table``, quoted as an identifier (never pasted into SQL)."""
    from psycopg import sql

    parts = table.split(".")
    if not 1 <= len(parts) <= 2 or not all(parts):
        raise ConfigurationError(f"{table!r} is not a table name (use 'table' or 'schema.table')")
    return sql.Identifier(*parts)


class PostgresLeaseStore:
    """Leases and done records in a PostgreSQL table, for workers on many hosts.

    ``url``: a ``postgresql://`` URL (libpq's parameters in its query are honoured).
    ``table``: the table of the records, created by :meth:`open` if missing (``schema.table``
    names another schema). ``pool_size``: at most this many connections per store (one worker
    process), opened as they are needed.
    """

    def __init__(self, url: str, *, table: str = "steadyrabbit_leases", pool_size: int = 4) -> None:
        require_psycopg("the PostgreSQL lease store", pool=True)
        self._url = url
        self.table = table
        self.description = mask_url(url)
        self._pool_size = pool_size
        self._pool: AsyncConnectionPool[AsyncConnection[Any]] | None = None
        self._host = socket.gethostname()
        self._sql = _statements(table_identifier(table), table.rpartition(".")[2])

    # -- lifecycle

    async def open(self) -> None:
        from psycopg_pool import AsyncConnectionPool

        pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
            self._url,
            min_size=1,
            max_size=self._pool_size,
            kwargs={"autocommit": True},
            open=False,
            timeout=10.0,
            name="steadyrabbit-leases",
        )
        try:
            await pool.open(wait=True, timeout=10.0)
            async with pool.connection() as connection, connection.transaction():
                # Workers starting together would race on CREATE TABLE IF NOT EXISTS (it
                # can fail on the catalog's unique index): one at a time.
                await connection.execute(self._sql["lock"], (self.table,))
                await connection.execute(self._sql["create"])
                await connection.execute(self._sql["index"])
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    def _connection(self) -> AbstractAsyncContextManager[AsyncConnection[Any]]:
        if self._pool is None:
            raise RuntimeError("the lease store is not open")
        return self._pool.connection()

    # -- the operations

    async def acquire(
        self, key: str, token: str, lease: float, *, marker: str | None = None
    ) -> Acquired:
        owner = token.rpartition("/")[0]
        dead: str | None = None  # the token of a run of this host whose process is gone
        async with self._connection() as connection:
            for _ in range(_ROUNDS):
                taken = await connection.execute(
                    self._sql["take"],
                    {
                        "key": key,
                        "token": token,
                        "owner": owner,
                        "lease": float(lease),
                        "marker": marker,
                        "dead": dead,
                    },
                )
                if await taken.fetchone() is not None:
                    return Acquired(Verdict.RUN)
                # Not taken: the record says why (read afresh: it may have changed since).
                read = await connection.execute(self._sql["read"], (key,))
                row = await read.fetchone()
                if row is None:
                    continue  # released meanwhile: take it
                state, holder, holder_owner, unexpired = row
                alive = state == "running" and unexpired and holder != dead
                verdict = _verdict(state, holder, alive=alive, marker=marker)
                if verdict is None:
                    continue  # it may be taken now (expired, resolved meanwhile)
                if verdict.verdict in (Verdict.RUNNING, Verdict.REDELAY) and owner_gone(
                    holder_owner, host=self._host
                ):
                    dead = holder
                    continue
                return verdict
        raise RuntimeError(f"the record of {key!r} kept changing; gave up after {_ROUNDS} reads")

    async def begin(self, key: str, token: str, lease: float) -> None:
        # One round trip either way: the verdict is simply not needed (a first delivery).
        await self.acquire(key, token, lease)

    async def renew(self, leases: Sequence[tuple[str, str]], lease: float) -> None:
        if not leases:
            return
        keys = [key for key, _ in leases]
        tokens = [token for _, token in leases]
        async with self._connection() as connection:
            await connection.execute(
                self._sql["renew"], {"keys": keys, "tokens": tokens, "lease": float(lease)}
            )

    async def complete(self, key: str, token: str, retention: float) -> None:
        # Done even if another run took the lease over meanwhile: this one completed.
        async with self._connection() as connection:
            await connection.execute(
                self._sql["complete"],
                {"key": key, "token": token, "retention": float(retention)},
            )

    async def release(self, key: str, token: str) -> None:
        async with self._connection() as connection:
            await connection.execute(self._sql["release"], (key, token))

    async def resolve(self, key: str, token: str, retention: float) -> None:
        async with self._connection() as connection:
            await connection.execute(
                self._sql["resolve"],
                {"key": key, "token": token, "retention": float(retention)},
            )

    async def prune(self) -> int:
        async with self._connection() as connection:
            cursor = await connection.execute(self._sql["prune"], (_KEEP_RUNNING,))
            return int(cursor.rowcount)

    async def report(self) -> StoreReport:
        async with self._connection() as connection:
            cursor = await connection.execute(self._sql["report"])
            row = await cursor.fetchone()
        assert row is not None
        records, running, oldest = row
        return StoreReport(self.description, int(records), int(running), oldest)


def _verdict(state: str, holder: str, *, alive: bool, marker: str | None) -> Acquired | None:
    """The verdict of :meth:`._leases.SQLiteLeaseStore.acquire` on an existing record; None
    when the record may be taken over."""
    if marker is None:
        if state == "done":
            return Acquired(Verdict.DONE)
        if alive:
            return Acquired(Verdict.RUNNING, holder)
        return None
    if holder != marker or state != "running":
        return Acquired(Verdict.DROP)
    if alive:
        return Acquired(Verdict.REDELAY)
    return None


def _statements(table: sql.Identifier, name: str) -> dict[str, sql.Composed]:
    from psycopg import sql

    def compose(text: str, **more: sql.Composable) -> sql.Composed:
        return sql.SQL(text).format(table=table, now=sql.SQL(_NOW), **more)

    # A record that may be taken: with no marker, any but a done one or a live run's; with a
    # marker, only the run it stands for, once that run is dead. "Live": running, unexpired
    # and not a run this host knows to be gone (%(dead)s).
    take_allowed = (
        "CASE WHEN %(marker)s::text IS NULL THEN l.state <> 'done'"
        " ELSE l.state = 'running' AND l.token = %(marker)s::text END"
        " AND NOT (l.state = 'running' AND l.expires > excluded.updated"
        " AND l.token IS DISTINCT FROM %(dead)s::text)"
    )
    return {
        "lock": compose("SELECT pg_advisory_xact_lock(hashtext(%s))"),
        "create": compose(
            "CREATE TABLE IF NOT EXISTS {table} ("
            " key text PRIMARY KEY, state text NOT NULL, token text NOT NULL,"
            " owner text NOT NULL, expires double precision NOT NULL,"
            " updated double precision NOT NULL)"
        ),
        "index": compose(
            "CREATE INDEX IF NOT EXISTS {index} ON {table} (state, expires)",
            index=sql.Identifier(f"{name}_expires"),
        ),
        "take": compose(
            "INSERT INTO {table} AS l (key, state, token, owner, expires, updated)"
            " SELECT %(key)s, 'running', %(token)s, %(owner)s, n.now + %(lease)s, n.now"
            " FROM {now}"
            " ON CONFLICT (key) DO UPDATE SET state = 'running', token = excluded.token,"
            " owner = excluded.owner, expires = excluded.expires, updated = excluded.updated"
            f" WHERE {take_allowed}"
            " RETURNING l.token"
        ),
        "read": compose(
            "SELECT state, token, owner, expires > extract(epoch FROM now())::float8"
            " FROM {table} WHERE key = %s"
        ),
        "renew": compose(
            "UPDATE {table} AS l SET expires = n.now + %(lease)s, updated = n.now"
            " FROM {now}, unnest(%(keys)s::text[], %(tokens)s::text[]) AS r (key, token)"
            " WHERE l.key = r.key AND l.token = r.token AND l.state = 'running'"
        ),
        "complete": compose(
            "INSERT INTO {table} AS l (key, state, token, owner, expires, updated)"
            " SELECT %(key)s, 'done', %(token)s, '', n.now + %(retention)s, n.now FROM {now}"
            " ON CONFLICT (key) DO UPDATE SET state = 'done', token = excluded.token,"
            " owner = '', expires = excluded.expires, updated = excluded.updated"
        ),
        "release": compose("DELETE FROM {table} WHERE key = %s AND token = %s"),
        "resolve": compose(
            "UPDATE {table} AS l SET state = 'resolved', expires = n.now + %(retention)s,"
            " updated = n.now FROM {now} WHERE l.key = %(key)s AND l.token = %(token)s"
        ),
        # A running record is kept a while past its expiry: its marker may still come back.
        "prune": compose(
            "DELETE FROM {table} AS l USING {now}"
            " WHERE (l.state <> 'running' AND l.expires < n.now)"
            " OR (l.state = 'running' AND l.expires < n.now - %s)"
        ),
        "report": compose(
            "SELECT count(*), count(*) FILTER (WHERE state = 'running'), min(updated) FROM {table}"
        ),
    }
