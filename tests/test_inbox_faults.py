"""The PostgreSQL inbox under connection kills: database effects exactly once.

Three workers share one queue; each handler writes a row to PostgreSQL in the same transaction
as the inbox's key. The broker closes every connection every 2 s, so acks are lost and messages
come back, to any of the three workers, sometimes while their first run is still going. No
message's row may be missing, and none may be there twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import uuid
from collections.abc import AsyncIterator

import pika
import psycopg
import pytest
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from steadyrabbit import App, Message, PostgresInbox, Worker
from tests._broker import BrokerNode
from tests.conftest import Admin, MakeSettings, eventually

# The test waits up to 240 s for its rows (a kill every 2 s slows the three workers down
# the more, the busier the machine: 70 s alone, over 120 s beside a soak): its timeout is
# longer than that wait, so that a slow run fails with what was missing, not a stack dump.
pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(300)]

POSTGRES_URL = os.environ.get(
    "STEADYRABBIT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
MESSAGES = 1000


@pytest.fixture
async def tables() -> AsyncIterator[tuple[str, str]]:
    suffix = uuid.uuid4().hex[:8]
    inbox, effects = f"test_inbox_{suffix}", f"test_effects_{suffix}"
    async with await psycopg.AsyncConnection.connect(POSTGRES_URL, autocommit=True) as db:
        await db.execute(
            sql.SQL("CREATE TABLE {} (message_id text NOT NULL, worker int NOT NULL)").format(
                sql.Identifier(effects)
            )
        )
        await PostgresInbox(inbox).create_table(db)
        try:
            yield inbox, effects
        finally:
            for table in (inbox, effects):
                await db.execute(
                    sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table))
                )


async def test_three_workers_under_connection_kills_write_every_row_exactly_once(
    private_node: BrokerNode,
    private_admin: Admin,
    queue_name: str,
    node_settings: MakeSettings,
    tables: tuple[str, str],
) -> None:
    inbox_table, effects = tables
    inbox = PostgresInbox(inbox_table)
    insert = sql.SQL("INSERT INTO {} (message_id, worker) VALUES (%s, %s)").format(
        sql.Identifier(effects)
    )
    private_admin.declare(queue_name)
    with pika.BlockingConnection(pika.URLParameters(private_node.url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        for n in range(MESSAGES):
            channel.basic_publish(
                "",
                queue_name,
                f"m-{n}".encode(),
                pika.BasicProperties(delivery_mode=2, message_id=f"m-{n}"),
            )
    refused: list[str] = []  # copies the inbox said were done already
    async with AsyncConnectionPool(POSTGRES_URL, min_size=4, max_size=32, open=False) as pool:
        workers = []
        for number in range(3):
            app = App()

            @app.consumer(queue_name, concurrency=10)
            async def handle(message: Message, number: int = number) -> None:
                async with pool.connection() as db, db.transaction():
                    if not await inbox.receive(db, message):
                        refused.append(str(message.message_id))
                        return  # its effects are committed already
                    await db.execute(insert, (message.message_id, number))
                    await asyncio.sleep(random.uniform(0.05, 0.3))

            workers.append(
                Worker(app, node_settings(name=f"inbox-{number}", reconnect_delay=0.2))
            )

        async def count() -> tuple[int, int]:
            async with pool.connection() as db:
                cursor = await db.execute(
                    sql.SQL("SELECT count(*), count(DISTINCT message_id) FROM {}").format(
                        sql.Identifier(effects)
                    )
                )
                row = await cursor.fetchone()
                assert row is not None
                return int(row[0]), int(row[1])

        async def every_row() -> bool:
            _rows, distinct = await count()
            return distinct == MESSAGES

        async def kill_connections(stop: asyncio.Event) -> int:
            kills = 0
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 2)
                if stop.is_set():
                    break
                await asyncio.to_thread(private_node.ctl, "close_all_connections", "test: kill")
                kills += 1
            return kills

        for worker in workers:
            await worker.start()
        stop = asyncio.Event()
        killer = asyncio.create_task(kill_connections(stop))
        try:
            await eventually(every_row, within=240, what="every message's row")
        except AssertionError as exc:
            # Say where the missing rows are: still queued, unacked, or never run.
            rows, distinct = await count()
            listing = await asyncio.to_thread(
                private_node.ctl,
                "list_queues", "name", "messages_ready", "messages_unacknowledged", "consumers",
                "--no-table-headers", "--quiet",
            )
            stats = [vars(worker.stats) for worker in workers]
            raise AssertionError(
                f"{exc}: {distinct} of {MESSAGES} rows ({rows} in all); queues: {listing!r}; "
                f"refused by the inbox: {len(refused)}; workers: {stats}"
            ) from None
        finally:
            stop.set()
            kills = await killer
            for worker in workers:
                await worker.stop()
        rows, distinct = await count()
        suppressed = sum(worker.stats.duplicates for worker in workers)
    assert kills >= 2
    # The kills did redeliver messages whose effects were done: the leases (same process)
    # or the inbox (another worker) stopped them.
    assert suppressed + len(refused) > 0
    assert (rows, distinct) == (MESSAGES, MESSAGES)

