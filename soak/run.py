"""A fault soak with full accounting: ``scripts/soak [--minutes M] [--messages N] [--seed S]``.

On a private RabbitMQ node (the machine's broker is never touched), with a fault proxy between
it and a worker process (``soak/app.py``):

1. N messages with unique ids are published with confirms, evenly over the soak: ``ok``,
   ``slow`` (5 s: longer than two heartbeat intervals), ``flaky`` (fails its first attempt) and
   ``poison`` (always fails).
2. Meanwhile, for M minutes, faults come at random intervals (3-12 s apart): broker-side connection
   closes, resets and black holes through the proxy (longer than two heartbeats), a frozen broker
   (SIGSTOP, then SIGCONT), a node stop and start, the worker SIGKILLed or SIGTERMed and started
   again, and a memory alarm while retries are being published.
3. The faults stop; the worker gets up to two minutes to drain the queue, then stops.
4. Every message is accounted for: completed (its handler ran to completion: once, or more
   often, duplicated), dead-lettered (with its reason), still queued, or lost. **Lost must be
   0**: the report (JSON, and a table) says so, and the exit status is 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pika

from steadyrabbit import Publisher, PublishTimeoutError, Settings
from steadyrabbit.testing import BrokerNode, Direction, FaultProxy, start_node

__all__ = ["Report", "soak"]

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "steadyrabbit-soak"
HEARTBEAT = 2
MIX = (("ok", 0.86), ("slow", 0.04), ("flaky", 0.06), ("poison", 0.04))
FAULTS = (
    "close_connections",
    "proxy_reset",
    "black_hole",
    "frozen_broker",
    "node_restart",
    "worker_sigkill",
    "worker_sigterm",
    "memory_alarm",
)


@dataclass
class Report:
    """What became of every message."""

    minutes: float
    seed: int
    published: int
    completed: int = 0
    duplicated: int = 0
    dead_lettered: int = 0
    still_queued: int = 0
    lost: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    lost_ids: list[str] = field(default_factory=list)
    duplicated_ids: list[str] = field(default_factory=list)

    def table(self) -> str:
        rows = [
            ("published", self.published),
            ("completed", self.completed),
            ("  of which more than once (duplicated)", self.duplicated),
            ("dead-lettered (with reason)", self.dead_lettered),
            ("still queued", self.still_queued),
            ("lost", self.lost),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {count:>7,}" for name, count in rows]
        lines.append("faults: " + ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())))
        return "\n".join(lines)


class WorkerProcess:
    """``steadyrabbit run soak.app:app`` through the proxy, started again after each kill."""

    def __init__(self, url: str, workdir: Path, completions: Path) -> None:
        self._url = url
        self._workdir = workdir
        self._completions = completions
        self._proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STEADYRABBIT_")}
        env.update(SOAK_QUEUE=QUEUE, SOAK_COMPLETIONS=str(self._completions))
        self.starts += 1
        log = (self._workdir / f"worker-{self.starts}.log").open("wb")
        with log:
            self._proc = subprocess.Popen(
                [
                    sys.executable, "-m", "steadyrabbit", "run", "soak.app:app",
                    "--url", self._url, "--heartbeat", str(HEARTBEAT),
                    "--state-dir", str(self._workdir / "state"), "--grace-period", "10",
                ],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def stop(self, sig: int, timeout: float = 30) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _admin(node: BrokerNode, action: Callable[[Any], Any]) -> Any:
    connection = pika.BlockingConnection(pika.URLParameters(node.url))
    try:
        return action(connection.channel())
    finally:
        connection.close()


def _drain(node: BrokerNode, queue: str) -> list[tuple[Any, bytes]]:
    def take(channel: Any) -> list[tuple[Any, bytes]]:
        taken = []
        with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
            while True:
                method, properties, body = channel.basic_get(queue, auto_ack=True)
                if method is None:
                    break
                taken.append((properties, body))
        return taken

    return list(_admin(node, take))


def _waiting(node: BrokerNode) -> int:
    """Messages ready or unacknowledged in the soak's queues (rabbitmqctl's view)."""
    listing = node.ctl(
        "list_queues", "name", "messages", "--no-table-headers", "--quiet", timeout=30
    )
    total = 0
    for line in listing.splitlines():
        name, _, count = line.partition("\t")
        if name == QUEUE or name.startswith(f"{QUEUE}.retry."):
            total += int(count or 0)
    return total


async def _publish_all(node: BrokerNode, bodies: list[str], seconds: float) -> None:
    """Publish ``bodies`` evenly over ``seconds``, so that faults find messages in flight.

    The publisher lives through the same faults (node restarts, a frozen broker, alarms): a
    publish that timed out is sent again with the same id, which the worker runs once.
    """
    batches = [bodies[start : start + 20] for start in range(0, len(bodies), 20)]
    pause = seconds / max(len(batches), 1)
    async with Publisher(Settings(url=node.url, reconnect_delay_max=2.0)) as publisher:

        async def publish(body: str) -> None:
            while True:
                try:
                    await publisher.publish(body.encode(), routing_key=QUEUE, message_id=body)
                except PublishTimeoutError:
                    continue
                else:
                    return

        for batch in batches:
            await asyncio.gather(*(publish(body) for body in batch))
            await asyncio.sleep(pause)


async def _fault(
    name: str, node: BrokerNode, proxy: FaultProxy, worker: WorkerProcess
) -> None:
    """Apply one fault and undo it (where it is undone)."""
    if name == "close_connections":
        await asyncio.to_thread(node.close_all_connections, "soak fault")
    elif name == "proxy_reset":
        proxy.reset()
    elif name == "black_hole":
        proxy.black_hole(Direction.BOTH)
        await asyncio.sleep(2 * HEARTBEAT + 2)
        proxy.resume(Direction.BOTH)
    elif name == "frozen_broker":
        assert node.pid is not None
        os.killpg(node.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(2 * HEARTBEAT + 2)
        finally:
            os.killpg(node.pid, signal.SIGCONT)
    elif name == "node_restart":
        await asyncio.to_thread(node.stop_app)
        await asyncio.sleep(2)
        await asyncio.to_thread(node.start_app)
    elif name in ("worker_sigkill", "worker_sigterm"):
        sig = signal.SIGKILL if name == "worker_sigkill" else signal.SIGTERM
        await asyncio.to_thread(worker.stop, sig)
        worker.start()
    elif name == "memory_alarm":
        await asyncio.to_thread(node.ctl, "set_vm_memory_high_watermark", "0.000001")
        try:
            await asyncio.sleep(5)
        finally:
            await asyncio.to_thread(node.ctl, "set_vm_memory_high_watermark", "0.4")
    else:
        raise ValueError(f"unknown fault {name!r}")


async def soak(
    minutes: float, messages: int, seed: int, workdir: Path, log: Callable[[str], None]
) -> Report:
    rng = random.Random(seed)
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    bodies = [f"{rng.choices(kinds, weights)[0]}:{n}" for n in range(messages)]
    report = Report(minutes=minutes, seed=seed, published=messages)
    completions = workdir / "completions.txt"
    node = await asyncio.to_thread(start_node, workdir / "node")
    try:
        _admin(node, lambda ch: ch.queue_declare(QUEUE, durable=True))
        async with FaultProxy(node.url) as proxy:
            worker = WorkerProcess(proxy.url, workdir, completions)
            worker.start()
            # Published all along the faults (the last ones a little before they end).
            publishing = asyncio.ensure_future(_publish_all(node, bodies, minutes * 60 * 0.8))
            deadline = time.monotonic() + minutes * 60
            try:
                while time.monotonic() < deadline:
                    await asyncio.sleep(rng.uniform(3, 12))
                    name = rng.choice(FAULTS)
                    report.faults[name] = report.faults.get(name, 0) + 1
                    log(f"fault: {name}")
                    await _fault(name, node, proxy, worker)
                await publishing
            finally:
                if not publishing.done():
                    publishing.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await publishing
            log(f"published {messages:,} messages with confirms; faults over; draining")
            drained = await _until(lambda: _waiting(node) == 0, 120)
            log("drained" if drained else "still messages waiting after two minutes")
            await asyncio.to_thread(worker.stop, signal.SIGTERM)
        _account(report, bodies, node, completions)
    finally:
        await asyncio.to_thread(node.stop)
    return report


async def _until(check: Callable[[], bool], within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await asyncio.to_thread(check):
            return True
        await asyncio.sleep(1)
    return False


def _account(report: Report, bodies: list[str], node: BrokerNode, completions: Path) -> None:
    runs = Counter(completions.read_text().split()) if completions.exists() else Counter()
    dead: dict[str, str] = {}
    for properties, raw in _drain(node, f"{QUEUE}.dlq"):
        reason = (properties.headers or {}).get("x-steadyrabbit-reason", "(no reason)")
        dead[raw.decode()] = str(reason)
    queued: set[str] = set()
    retry_queues = [
        line.partition("\t")[0]
        for line in node.ctl("list_queues", "name", "--no-table-headers", "--quiet").splitlines()
        if line.startswith(f"{QUEUE}.retry.")
    ]
    for queue in (QUEUE, *retry_queues):
        queued.update(raw.decode() for _, raw in _drain(node, queue))
    for body in bodies:
        if runs[body]:
            report.completed += 1
            if runs[body] > 1:
                report.duplicated += 1
                report.duplicated_ids.append(body)
        elif body in dead:
            report.dead_lettered += 1
            reason = dead[body].split(":")[0]
            report.dead_letter_reasons[reason] = report.dead_letter_reasons.get(reason, 0) + 1
        elif body in queued:
            report.still_queued += 1
        else:
            report.lost += 1
            report.lost_ids.append(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    with tempfile.TemporaryDirectory(prefix="steadyrabbit-soak-") as tmp:
        started = time.monotonic()

        def log(text: str) -> None:
            print(f"[{time.monotonic() - started:7.1f} s] {text}", flush=True)

        report = asyncio.run(soak(args.minutes, args.messages, seed, Path(tmp), log))
    print(report.table())
    document = json.dumps(asdict(report), indent=2)
    print(document)
    if args.json:
        args.json.write_text(document + "\n")
    sys.exit(0 if report.lost == 0 else 1)


if __name__ == "__main__":
    main()

