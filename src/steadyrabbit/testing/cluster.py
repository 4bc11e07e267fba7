"""A local RabbitMQ cluster for trying failover by hand: ``scripts/cluster start|stop|status``
(or ``python -m steadyrabbit.testing.cluster``).

``start`` runs, in the background, a small process that starts private nodes (:func:`start_cluster`:
their own ports, data and cookie; the machine's broker is left alone), joins them, writes
``DIR/cluster.json`` and keeps them until ``stop``. ``status`` shows each node and the cluster's
view of its members.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ._node import BrokerNode, start_cluster

__all__ = ["main"]

STATE = "cluster.json"


def _hold(directory: Path, size: int) -> None:
    """The background process: start the cluster, publish its state, wait for SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with start_cluster(directory / "nodes", size, plugins=["rabbitmq_management"]) as cluster:
        state = {
            "pid": os.getpid(),
            "urls": cluster.urls,
            "nodes": [
                {
                    "nodename": n.nodename,
                    "port": n.port,
                    "mgmt_url": n.mgmt_url,
                    "home": str(n.home),
                    "rabbitmq_bin": str(n.rabbitmq_bin),
                    "env": n.env,
                }
                for n in cluster.nodes
            ],
        }
        (directory / STATE).write_text(json.dumps(state, indent=2) + "\n")
        try:
            stop.wait()
        finally:
            (directory / STATE).unlink(missing_ok=True)


def _state(directory: Path) -> dict[str, object] | None:
    path = directory / STATE
    if not path.exists():
        return None
    state: dict[str, object] = json.loads(path.read_text())
    return state


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def start(directory: Path, size: int) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    state = _state(directory)
    if state is not None and _alive(int(str(state["pid"]))):
        print(f"a cluster already runs from {directory} (pid {state['pid']})")
        return 0
    log = directory / "cluster.log"
    with log.open("wb") as out:
        holder = subprocess.Popen(
            [sys.executable, "-m", "steadyrabbit.testing.cluster", "_hold", str(directory),
             str(size)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 180
    while _state(directory) is None:
        if holder.poll() is not None or time.monotonic() > deadline:
            print(f"the cluster did not start; its log ({log}):\n{log.read_text()[-3000:]}")
            holder.kill()
            return 1
        time.sleep(0.5)
    return status(directory)


def stop(directory: Path) -> int:
    state = _state(directory)
    if state is None:
        print(f"no cluster runs from {directory}")
        return 0
    pid = int(str(state["pid"]))
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 90
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.5)
    (directory / STATE).unlink(missing_ok=True)
    print("cluster stopped")
    return 0


def status(directory: Path) -> int:
    state = _state(directory)
    if state is None or not _alive(int(str(state["pid"]))):
        print(f"no cluster runs from {directory}")
        return 1
    nodes = state["nodes"]
    assert isinstance(nodes, list)
    print(f"cluster of {len(nodes)} nodes (held by pid {state['pid']}); give a worker every URL:")
    for entry in nodes:
        print(f"  {entry['nodename']}  amqp://guest:guest@127.0.0.1:{entry['port']}/%2F  "
              f"management {entry['mgmt_url']}")
    first = nodes[0]
    node = BrokerNode(
        nodename=first["nodename"], port=first["port"], home=Path(first["home"]),
        rabbitmq_bin=Path(first["rabbitmq_bin"]), env=first["env"],
    )  # fmt: skip
    try:
        running = json.loads(node.ctl("cluster_status", "--formatter", "json"))["running_nodes"]
    except RuntimeError as exc:
        print(f"cluster_status failed: {exc}")
        return 1
    print(f"running members: {', '.join(sorted(running))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["start", "stop", "status", "_hold"])
    parser.add_argument("directory", nargs="?", default=".cluster", type=Path)
    parser.add_argument("size", nargs="?", default=3, type=int)
    args = parser.parse_args(argv)
    directory: Path = args.directory.resolve()
    if args.command == "_hold":
        _hold(directory, args.size)
        return 0
    if args.command == "start":
        return start(directory, args.size)
    if args.command == "stop":
        return stop(directory)
    return status(directory)


if __name__ == "__main__":
    sys.exit(main())
