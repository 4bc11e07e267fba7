"""The machine's main broker, and private nodes (from :mod:`steadyrabbit.testing`).

Private nodes live in the public test kit (``steadyrabbit.testing.start_node``); they are
re-exported here so that the project's tests keep one import. The main broker
(``rabbit@localhost`` on 127.0.0.1:5672) is never stopped or reconfigured by the tests:
``main_broker_ctl()`` only runs ``rabbitmqctl`` against it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

from steadyrabbit.testing import BrokerNode, start_node
from steadyrabbit.testing._node import clean_environ, run_ctl

__all__ = [
    "MAIN_NODENAME",
    "MAIN_URL",
    "BrokerNode",
    "close_main_broker_connections",
    "main_broker_ctl",
    "start_node",
]

MAIN_NODENAME = "rabbit@localhost"
MAIN_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def main_broker_ctl(*args: str, timeout: float = 60) -> str:
    """``rabbitmqctl ARGS`` against the machine's main broker (rabbit@localhost)."""
    env = clean_environ()
    if "HOME" in os.environ:
        env["HOME"] = os.environ["HOME"]
    return run_ctl(["rabbitmqctl", *args], env, timeout)


def close_main_broker_connections(info: str, matches: Callable[[str], bool], reason: str) -> int:
    """Close, broker side, the main broker's connections whose ``info`` column (of
    ``rabbitmqctl list_connections``: user, client_properties, ...) ``matches``; return how
    many. Never all of them: other tests and sessions may share this broker."""
    listing = main_broker_ctl("list_connections", "pid", info, "--no-table-headers", "--quiet")
    closed = 0
    for line in listing.splitlines():
        pid, _, value = line.partition("\t")
        if pid.strip() and matches(value.strip()):
            main_broker_ctl("close_connection", pid.strip(), reason)
            closed += 1
    return closed


def close_connections_of(pid: int, reason: str) -> int:
    """Close, broker side, the main broker's connections that process ``pid`` holds (found by
    their local ports, as ``ss`` shows them); return how many."""
    listing = subprocess.run(
        ["ss", "-tnpH", "state", "established", "( dport = :5672 )"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    ports = {
        line.split()[2].rpartition(":")[2]
        for line in listing.splitlines()
        if f"pid={pid}," in line
    }
    if not ports:
        return 0
    connections = main_broker_ctl(
        "list_connections", "pid", "peer_port", "--no-table-headers", "--quiet"
    )
    closed = 0
    for line in connections.splitlines():
        connection, _, peer_port = line.partition("\t")
        if peer_port.strip() in ports:
            main_broker_ctl("close_connection", connection.strip(), reason)
            closed += 1
    return closed
