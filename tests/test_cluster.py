"""A three-node cluster with quorum queues: the worker fails over by itself while the node it is
connected to stops, then the queue's leader, then a node is SIGKILLed; every message completes
once (idempotency suppresses the redelivered ones), and the quorum retry and dead-letter queues
keep theirs."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from typing import Any

import pytest

from steadyrabbit import App, Message, Middleware, Publisher, Reject, Retry, RetryPolicy, Worker
from steadyrabbit._url import BrokerAddress
from steadyrabbit.testing import BrokerNode, Cluster
from tests.conftest import Admin, MakeSettings, Settled, eventually

# In the everyday run: the cluster starts once (about 18 s) for the whole run, the fixture
# `cluster` in conftest.py, and stops in parallel at its end.
pytestmark = [pytest.mark.anyio, pytest.mark.cluster]


class Connections(Middleware):
    """Which port each connection role is on now."""

    def __init__(self) -> None:
        self.port: dict[str, int] = {}
        self.reconnects = 0

    def on_connected(self, role: str, address: BrokerAddress) -> None:
        self.port[role] = address.port

    def on_reconnecting(self, role: str, cause: str, error: Exception) -> None:
        self.reconnects += 1


async def test_a_worker_fails_over_across_node_stops_and_a_kill_losing_nothing(
    cluster: Cluster, make_settings: MakeSettings
) -> None:
    queue = f"cluster-{uuid.uuid4().hex[:6]}"
    total, poison, flaky = 240, 6, 6
    admin = Admin(cluster.urls[0])
    connections, settled = Connections(), Settled()
    app = App(
        queue_type="quorum",
        middleware=[connections, settled],
        retry=RetryPolicy(max_attempts=3, delays=(0.2,)),
    )
    completed: Counter[str] = Counter()
    retried: set[str] = set()

    @app.consumer(queue, concurrency=8)
    async def handle(message: Message) -> None:
        body = message.body.decode()
        if body.startswith("poison"):
            raise Reject("poison")
        if body.startswith("flaky") and body not in retried:
            retried.add(body)
            raise Retry("once")
        await asyncio.sleep(0.05)
        completed[body] += 1

    settings = make_settings(
        urls=cluster.urls, heartbeat=2, reconnect_delay=0.1, reconnect_delay_max=1.0
    )
    bodies = (
        [f"ok-{n}" for n in range(total - poison - flaky)]
        + [f"poison-{n}" for n in range(poison)]
        + [f"flaky-{n}" for n in range(flaky)]
    )

    async def stop_and_start(node: BrokerNode, how: str) -> None:
        await asyncio.to_thread(node.kill if how == "kill" else node.stop_app)
        await asyncio.sleep(2)  # the worker notices and moves on meanwhile
        await asyncio.to_thread(node.restart if how == "kill" else node.start_app)

    try:
        async with Worker(app, settings):
            async with Publisher(settings) as publisher:
                for body in bodies:
                    await publisher.publish(body.encode(), routing_key=queue, message_id=body)
            await eventually(lambda: sum(completed.values()) >= 40, what="a first part")
            connected = cluster.node_on_port(connections.port["consume"])
            await stop_and_start(connected, "stop")
            await eventually(lambda: sum(completed.values()) >= 100, within=60, what="more")
            await stop_and_start(cluster.queue_leader(queue), "stop")
            await eventually(lambda: sum(completed.values()) >= 160, within=60, what="more")
            await stop_and_start(cluster.nodes[2], "kill")
            await eventually(
                lambda: len(completed) == total - poison, within=90, what="every message"
            )
            await eventually(lambda: admin.counts(f"{queue}.dlq")[0] == poison, what="dlq")
        assert connections.reconnects >= 2
        # Every message completed once: the redelivered ones were acked without a second run.
        assert set(completed) == set(bodies) - {b for b in bodies if b.startswith("poison")}
        assert max(completed.values()) == 1, [b for b, n in completed.items() if n > 1]
        assert admin.counts(queue)[0] == 0
        dead = sorted(body.decode() for _, body in admin.drain(f"{queue}.dlq"))
        assert dead == sorted(b for b in bodies if b.startswith("poison"))
    finally:
        for node in cluster.nodes:
            if not node.is_running():
                await asyncio.to_thread(node.restart)
        await asyncio.to_thread(
            Admin(cluster.running()[0].url).delete, queue, f"{queue}.dlq", f"{queue}.retry.200ms"
        )


def test_the_cluster_has_three_running_members(cluster: Cluster) -> None:
    status = cluster.ctl("cluster_status", "--formatter", "json")
    running: Any = json.loads(status)["running_nodes"]
    assert sorted(running) == sorted(node.nodename for node in cluster.nodes)
