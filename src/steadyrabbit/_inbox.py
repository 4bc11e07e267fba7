"""An inbox in PostgreSQL: a handler's database effects happen exactly once per message.

RabbitMQ delivers at least once: a worker that crashes (or loses its connection) after its
handler's transaction committed but before the broker got the ack sees the message again. The
inbox makes that copy harmless, for what the handler writes to the same PostgreSQL database::

    inbox = PostgresInbox()

    @app.consumer("orders")
    async def handle(message: Message) -> None:
        async with await AsyncConnection.connect(DSN) as db, db.transaction():
            if not await inbox.receive(db, message):
                return  # a copy of a message whose effects are committed: nothing to do
            await db.execute("INSERT INTO orders ...")

:meth:`PostgresInbox.receive` inserts the message's key into the inbox table **in the caller's
own transaction**, the one that holds the handler's writes. The key row therefore commits or
rolls back together with those writes, atomically:

- the transaction commits: the effects and the key are both there. If the worker dies before
  the ack, the copy that comes back finds the key, ``receive`` returns False, and the handler
  returns without effects (and the copy is acked);
- the transaction rolls back, or the worker dies before the commit: neither the effects nor
  the key are there, and the next copy runs as if it were the first.

Either way the database's effects happen exactly once, across crashes anywhere between the
commit and the ack. Two copies handled at the same time do not both run: the second one's
insert waits for the first one's transaction, then returns False if it committed (True if it
rolled back). The guarantee covers the writes of that one transaction only: what the handler
does elsewhere (an e-mail, an HTTP call, a write through another connection) may still happen
more than once.

The key is, by default, a SHA-256 of the virtual host, the queue, the ``message_id`` and the
body (a producer that reuses ids loses nothing), the same as the lease middleware's default
key; a message without a ``message_id`` needs a ``key=`` of the caller's.

psycopg 3 is needed (``pip install 'steadyrabbit[postgres]'``); it is imported only when an
inbox is made, never on ``import steadyrabbit``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._errors import ConfigurationError
from ._idempotency import default_key
from ._store_postgres import require_psycopg, table_identifier

if TYPE_CHECKING:
    from psycopg import AsyncConnection, Connection, sql

    from ._message import Message

__all__ = ["PostgresInbox"]


class PostgresInbox:
    """The keys of the messages whose effects are committed, in the table ``table``
    (``schema.table`` names another schema), with the queue and when each came.

    ``vhost``: the broker's virtual host, part of the default key (as in the lease middleware).
    """

    def __init__(self, table: str = "steadyrabbit_inbox", *, vhost: str = "/") -> None:
        require_psycopg("the PostgreSQL inbox")
        self.table = table
        self.vhost = vhost
        self._sql = _statements(table_identifier(table), table.rpartition(".")[2])

    def key(self, message: Message) -> str:
        """The message's default key: SHA-256 of the vhost, queue, ``message_id`` and body."""
        key = default_key(message, self.vhost)
        if key is None:
            raise ConfigurationError(
                f"{message!r} has no message_id, so the inbox cannot tell its copies apart: "
                "pass receive() a key of your own, or publish it with a message_id"
            )
        return key

    # -- the table

    async def create_table(self, connection: AsyncConnection[Any]) -> None:
        """Create the inbox table (and its index) if missing; committed, unless a transaction
        of the caller's is open (then it is part of it)."""
        async with connection.transaction():
            await connection.execute(self._sql["lock"], (self.table,))
            await connection.execute(self._sql["create"])
            await connection.execute(self._sql["index"])

    def create_table_sync(self, connection: Connection[Any]) -> None:
        """:meth:`create_table` on a sync connection."""
        with connection.transaction():
            connection.execute(self._sql["lock"], (self.table,))
            connection.execute(self._sql["create"])
            connection.execute(self._sql["index"])

    # -- each message

    async def receive(
        self, connection: AsyncConnection[Any], message: Message, *, key: str | None = None
    ) -> bool:
        """Record ``message`` (or ``key``) in the caller's open transaction: True the first
        time (go on; the key commits with the handler's writes), False for a copy whose effects
        are committed already (return without effects)."""
        params = self._row(connection, message, key)
        cursor = await connection.execute(self._sql["receive"], params)
        return cursor.rowcount == 1

    def receive_sync(
        self, connection: Connection[Any], message: Message, *, key: str | None = None
    ) -> bool:
        """:meth:`receive` on a sync connection, for sync handlers."""
        params = self._row(connection, message, key)
        return connection.execute(self._sql["receive"], params).rowcount == 1

    def _row(
        self, connection: AsyncConnection[Any] | Connection[Any], message: Message, key: str | None
    ) -> tuple[str, str]:
        from psycopg.pq import TransactionStatus

        if connection.autocommit and connection.info.transaction_status == TransactionStatus.IDLE:
            raise ConfigurationError(
                "the inbox must record the message in the transaction of the handler's writes, "
                "and this autocommit connection has none open: wrap receive() and the writes "
                "in 'with connection.transaction():'"
            )
        return (key if key is not None else self.key(message), message.queue)

    # -- retention

    async def prune(self, connection: AsyncConnection[Any], older_than: float) -> int:
        """Delete the keys received more than ``older_than`` seconds ago; return how many.
        Committed, unless the caller's transaction is open. A copy that comes back after its
        key was pruned runs again: keep keys longer than any copy can take to come back."""
        async with connection.transaction():
            cursor = await connection.execute(self._sql["prune"], (float(older_than),))
        return int(cursor.rowcount)

    def prune_sync(self, connection: Connection[Any], older_than: float) -> int:
        """:meth:`prune` on a sync connection."""
        with connection.transaction():
            cursor = connection.execute(self._sql["prune"], (float(older_than),))
        return int(cursor.rowcount)


def _statements(table: sql.Identifier, name: str) -> dict[str, sql.Composed]:
    from psycopg import sql

    def compose(text: str, **more: sql.Composable) -> sql.Composed:
        return sql.SQL(text).format(table=table, **more)

    return {
        # Workers creating the table together would race on CREATE TABLE IF NOT EXISTS (it can
        # fail on the catalog's unique index): one at a time.
        "lock": compose("SELECT pg_advisory_xact_lock(hashtext(%s))"),
        "create": compose(
            "CREATE TABLE IF NOT EXISTS {table} ("
            " key text PRIMARY KEY, queue text NOT NULL,"
            " received_at timestamptz NOT NULL DEFAULT now())"
        ),
        "index": compose(
            "CREATE INDEX IF NOT EXISTS {index} ON {table} (received_at)",
            index=sql.Identifier(f"{name}_received_at"),
        ),
        "receive": compose(
            "INSERT INTO {table} (key, queue, received_at) VALUES (%s, %s, now())"
            " ON CONFLICT (key) DO NOTHING"
        ),
        "prune": compose(
            "DELETE FROM {table} WHERE received_at < now() - make_interval(secs => %s)"
        ),
    }
