"""Scaling on one machine: `steadyrabbit run --processes N` for N = 1 and 2.

Measures W1 (no-op, 100-byte bodies) and a CPU-bound workload (a sync handler that burns ~2 ms
of CPU per message with the GIL held, where threads cannot help and processes can). Each run
pre-fills the queue, starts the real CLI with --processes N, and times from the first message
consumed to the queue being empty, as the broker reports it; then SIGTERM.
Rounds are interleaved (N=1, N=2, N=1, ...). Prints a table; --json prints one object per run.

    .venv/bin/python bench/scale.py [--rounds 3] [--messages 50000] [--cpu-messages 4000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pika

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "steadyrabbit-bench-scale"


def fill(url: str, count: int, size: int) -> None:
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        channel.queue_delete(QUEUE)
        channel.queue_delete(f"{QUEUE}.dlq")
        channel.queue_declare(QUEUE, durable=True)
        body = os.urandom(size // 2).hex().encode()[:size]
        for _ in range(count):
            channel.basic_publish("", QUEUE, body)
        while channel.queue_declare(QUEUE, passive=True).method.message_count < count:
            time.sleep(0.05)


def depth(channel: pika.adapters.blocking_connection.BlockingChannel) -> int:
    return int(channel.queue_declare(QUEUE, passive=True).method.message_count)


def measure(url: str, work: str, processes: int, count: int) -> float:
    fill(url, count, 100)
    env = {**os.environ, "SCALE_QUEUE": QUEUE, "SCALE_WORK": work}
    worker = subprocess.Popen(
        [sys.executable, "-m", "steadyrabbit", "run", "bench.scale_app:app", "--url", url,
         "--processes", str(processes), "--log-level", "error"],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
    )
    try:
        with pika.BlockingConnection(pika.URLParameters(url)) as connection:
            channel = connection.channel()
            while depth(channel) >= count:  # the harness polls the broker; the product does not
                time.sleep(0.002)
            began = time.monotonic()
            while depth(channel) > 0:
                time.sleep(0.01)
            # At most prefetch x N messages are still in flight: under 0.5 % of the run.
            elapsed = time.monotonic() - began
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        channel.queue_delete(QUEUE)
        channel.queue_delete(f"{QUEUE}.dlq")
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--cpu-messages", type=int, default=4_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results: dict[tuple[str, int], list[float]] = {}
    for round_ in range(args.rounds):
        for work, count in (("noop", args.messages), ("cpu", args.cpu_messages)):
            for processes in ((1, 2) if round_ % 2 == 0 else (2, 1)):
                rate = measure(args.url, work, processes, count)
                results.setdefault((work, processes), []).append(rate)
                if args.json:
                    print(json.dumps({"framework": "steadyrabbit", "workload": f"scale-{work}",
                                      "processes": processes, "round": round_ + 1,
                                      "msg_per_s": round(rate, 1)}), flush=True)
    print("| workload | processes | median msg/s | spread | x N=1 |")
    print("|---|---:|---:|---:|---:|")
    for work in ("noop", "cpu"):
        base = statistics.median(results[(work, 1)])
        for processes in (1, 2):
            rates = results[(work, processes)]
            median = statistics.median(rates)
            label = "W1 no-op" if work == "noop" else "CPU-bound, ~2 ms/msg"
            print(f"| {label} | {processes} | {median:,.0f} | {min(rates):,.0f}-{max(rates):,.0f}"
                  f" | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
