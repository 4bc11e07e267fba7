"""``steadyrabbit doctor`` on the session's three-node cluster (with the management plugin), run as
a user runs it: a healthy quorum queue raises nothing, a stopped member is named with the quorum
queue's offline replicas, and a classic queue is named as living on one node only.

The cluster is shared with tests/test_cluster.py: a node stopped here is started again before
the test ends, and every queue made here is deleted.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pika.exceptions
import pytest

from steadyrabbit.testing import BrokerNode, Cluster
from tests.conftest import Admin
from tests.test_doctor import EXIT_OK, Result, doctor, unique

# On the run's one shared cluster (the fixture `cluster` in conftest.py), as tests/test_cluster.py.
pytestmark = [pytest.mark.cluster]

QUORUM = {"x-queue-type": "quorum"}


def api(node: BrokerNode, path: str) -> Any:
    response = httpx.get(f"{node.mgmt_url}/api/{path}", auth=("guest", "guest"), timeout=10)
    return response.json() if response.status_code == 200 else None


def wait_until(check: Callable[[], bool], what: str, within: float = 60) -> None:
    """Wait for the management API to show what a test staged (it lags the broker by its
    statistics interval, 5 s), so that doctor sees it too."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        time.sleep(0.2)


def online(node: BrokerNode, queue: str) -> list[str]:
    data = api(node, f"queues/%2F/{quote(queue, safe='')}")
    return sorted(data.get("online") or []) if isinstance(data, dict) else []


def wait_online(node: BrokerNode, queue: str, expected: list[str]) -> None:
    """Wait until the management API of ``node`` shows ``queue``'s members ``expected`` online."""
    wait_until(lambda: online(node, queue) == expected, f"{queue}'s members {expected} online")


def run_doctor(node: BrokerNode, queue: str, *more: str) -> Result:
    return doctor(
        queue, "--url", node.url, "--management-url", node.mgmt_url, "--connect-timeout", "10",
        *more,
    )  # fmt: skip


@contextlib.contextmanager
def queues(admin: Admin, *declared: tuple[str, dict[str, Any] | None]) -> Iterator[None]:
    """Declare these queues on the cluster, and delete them after."""
    try:
        for name, arguments in declared:
            admin.declare(name, arguments)
        yield
    finally:
        with contextlib.suppress(pika.exceptions.AMQPError):
            admin.delete(*(name for name, _ in declared))


def test_a_quorum_queue_on_a_healthy_cluster_then_with_a_node_stopped(cluster: Cluster) -> None:
    first, _, last = cluster.nodes
    queue = unique("cluster-quorum")
    every = sorted(node.nodename for node in cluster.nodes)
    with queues(Admin(first.url), (queue, QUORUM), (f"{queue}.dlq", QUORUM)):
        for name in (queue, f"{queue}.dlq"):
            wait_online(first, name, every)
        healthy = run_doctor(first, queue)
        assert healthy.status == EXIT_OK, healthy.output
        # RabbitMQ 3.10: no default delivery limit either; nothing to warn about.
        assert healthy.problems() == [], healthy.stdout
        assert "✓ cluster of 3 nodes: all running, no partition" in healthy.flat
        assert (
            f"✓ queue {queue}: replicated: {queue} (quorum, 3 members online), {queue}.dlq "
            "(quorum, 3 members online)"
        ) in healthy.flat, healthy.stdout

        last.stop_app()
        try:
            stopped = last.nodename
            wait_until(
                lambda: [n["running"] for n in api(first, "nodes") if n["name"] == stopped]
                == [False],
                f"{stopped} shown as not running",
            )
            # Not waiting for the queues' "online" lists: after stop_app, 3.10 may go on
            # listing the stopped node's members online for a while (doctor counts a member on
            # a node that is not running as offline).
            result = run_doctor(first, queue)
            as_json = run_doctor(first, queue, "--json")
        finally:
            last.start_app()
    # Warnings, not critical: two of three nodes still run, a majority (the finding says so).
    assert result.status == EXIT_OK, result.output
    assert result.marked("✗") == [], result.stdout
    assert result.marked("!") == [
        f"! cluster node {stopped} is not running (2 of 3 running)",
        f"! quorum queue {queue}: 2 of 3 members online (offline: {stopped})",
        f"! quorum queue {queue}.dlq: 2 of 3 members online (offline: {stopped})",
    ], result.stdout
    assert "A warning rather than critical because the running nodes are a majority" in result.flat
    assert f"{stopped} (not running)" in result.flat.split("cluster: 3 nodes: ", 1)[1]

    document = as_json.json()
    assert as_json.status == EXIT_OK, as_json.output
    assert {node["name"]: node["running"] for node in document["nodes"]} == {
        name: name != stopped for name in every
    }
    [queue_report] = document["queues"]
    placed = queue_report["placements"][0]
    assert (placed["name"], placed["type"], sorted(placed["members"])) == (queue, "quorum", every)
    assert set(placed["online"]) >= set(every) - {stopped}
    assert [f["check"] for f in document["findings"] if f["level"] == "warning"] == [
        "cluster-node",
        "replicas",
        "replicas",
    ]


def test_a_classic_queue_on_the_cluster_is_not_replicated(cluster: Cluster) -> None:
    first = cluster.nodes[0]
    queue = unique("cluster-classic")
    with queues(Admin(first.url), (queue, None), (f"{queue}.dlq", None)):
        wait_until(
            lambda: isinstance(api(first, f"queues/%2F/{quote(queue + '.dlq', safe='')}"), dict),
            f"the management statistics of {queue}.dlq",
        )
        result = run_doctor(first, queue)
    assert result.status == EXIT_OK, result.output
    home = first.nodename  # a classic queue lives on the node it was declared on
    assert result.marked("!") == [
        f"! queue {queue}: not replicated (classic, one node each): {queue} on {home}, "
        f"{queue}.dlq on {home}"
    ], result.stdout
    assert "✓ cluster of 3 nodes: all running, no partition" in result.flat
    assert 'declare them anew with queue_type="quorum"' in result.flat
