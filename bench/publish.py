"""Publishing with confirms: steadyrabbit's Publisher and BlockingPublisher against raw pika,
aio-pika and FastStream, in one run.

    .venv/bin/python bench/publish.py                      # 3 rounds of 10,000 messages
    .venv/bin/python bench/publish.py --rounds 1 --messages 2000
    .venv/bin/python bench/publish.py --write              # and (re)write its BENCHMARKS.md section

Every publish is persistent, mandatory where the library allows it, to a fresh durable queue,
and confirmed by the broker. Two ways to publish:

* P1, one at a time: each publish waits for its confirm before the next (a web view that
  publishes and answers). Every library can.
* P2, 100 in flight: publishes are started while earlier ones wait for their confirms (a
  script pushing a batch), for the async libraries. Blocking pika cannot.

Each measurement is its own process; the order of the frameworks rotates every round; the queue
is checked to hold every message afterwards, then deleted. The table shows the median rate and
its ratio to pika's P1 rate of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pika

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
URL = os.environ.get("STEADYRABBIT_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
BODY = b"x" * 100
WINDOW = 100
BEGIN, END = "<!-- publish:begin -->", "<!-- publish:end -->"

# (framework, mode): what each run measures. pika's blocking connection waits for every
# confirm, so it has no P2.
RUNS = (
    ("pika", "P1"),
    ("steadyrabbit", "P1"),
    ("steadyrabbit-blocking", "P1"),
    ("aio-pika", "P1"),
    ("faststream", "P1"),
    ("steadyrabbit", "P2"),
    ("aio-pika", "P2"),
    ("faststream", "P2"),
)
LABELS = {
    "steadyrabbit": "steadyrabbit `Publisher`",
    "steadyrabbit-blocking": "steadyrabbit `BlockingPublisher`",
}


# -- the children: one measurement each ------------------------------------------------------


async def _in_windows(publish: Callable[[], Awaitable[Any]], messages: int, window: int) -> None:
    sent = 0
    while sent < messages:
        batch = min(window, messages - sent)
        await asyncio.gather(*(publish() for _ in range(batch)))
        sent += batch


async def run_steadyrabbit(queue: str, messages: int, window: int) -> float:
    from steadyrabbit import Publisher, Settings

    async with Publisher(Settings(url=URL)) as publisher:
        started = time.perf_counter()
        await _in_windows(lambda: publisher.publish(BODY, routing_key=queue), messages, window)
        return time.perf_counter() - started


def run_steadyrabbit_blocking(queue: str, messages: int) -> float:
    from steadyrabbit import BlockingPublisher, Settings

    with BlockingPublisher(Settings(url=URL)) as publisher:
        started = time.perf_counter()
        for _ in range(messages):
            publisher.publish(BODY, routing_key=queue)
        return time.perf_counter() - started


def run_pika(queue: str, messages: int) -> float:
    connection = pika.BlockingConnection(pika.URLParameters(URL))
    channel = connection.channel()
    channel.confirm_delivery()
    properties = pika.BasicProperties(delivery_mode=2)
    started = time.perf_counter()
    for _ in range(messages):
        channel.basic_publish("", queue, BODY, properties, mandatory=True)
    elapsed = time.perf_counter() - started
    connection.close()
    return elapsed


async def run_aio_pika(queue: str, messages: int, window: int) -> float:
    import aio_pika

    connection = await aio_pika.connect_robust(URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = channel.default_exchange

        def publish() -> Awaitable[Any]:
            message = aio_pika.Message(BODY, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            return exchange.publish(message, routing_key=queue, mandatory=True)

        started = time.perf_counter()
        await _in_windows(publish, messages, window)
        return time.perf_counter() - started


async def run_faststream(queue: str, messages: int, window: int) -> float:
    from faststream.rabbit import RabbitBroker

    async with RabbitBroker(URL, logger=None) as broker:
        started = time.perf_counter()
        await _in_windows(
            lambda: broker.publish(BODY, queue=queue, persist=True, mandatory=True),
            messages,
            window,
        )
        return time.perf_counter() - started


def child(framework: str, mode: str, queue: str, messages: int) -> float:
    window = WINDOW if mode == "P2" else 1
    if framework == "pika":
        return run_pika(queue, messages)
    if framework == "steadyrabbit-blocking":
        return run_steadyrabbit_blocking(queue, messages)
    runner = {
        "steadyrabbit": run_steadyrabbit,
        "aio-pika": run_aio_pika,
        "faststream": run_faststream,
    }[framework]
    return asyncio.run(runner(queue, messages, window))


# -- the parent ------------------------------------------------------------------------------


def admin(action: Callable[[Any], Any]) -> Any:
    connection = pika.BlockingConnection(pika.URLParameters(URL))
    try:
        return action(connection.channel())
    finally:
        connection.close()


def measure(framework: str, mode: str, messages: int) -> float:
    queue = f"steadyrabbit-bench-publish-{uuid.uuid4().hex[:8]}"
    admin(lambda ch: ch.queue_declare(queue, durable=True))
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--child", framework, mode, queue, str(messages)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        elapsed = float(out.strip().splitlines()[-1])
        held = admin(lambda ch: ch.queue_declare(queue, passive=True).method.message_count)
        if held != messages:
            raise SystemExit(f"{framework} {mode}: the queue holds {held} of {messages}")
        return messages / elapsed
    finally:
        admin(lambda ch: ch.queue_delete(queue))


def versions() -> dict[str, str]:
    import importlib.metadata

    found = {}
    for name in ("steadyrabbit", "pika", "aio-pika", "aiormq", "faststream"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def render(results: dict[tuple[str, str], list[float]], messages: int, rounds: int) -> str:
    baseline = statistics.median(results[("pika", "P1")])
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    shown = ", ".join(f"{k} {v}" for k, v in versions().items())
    lines = [
        BEGIN,
        "## Publishing with confirms",
        "",
        "Written by `bench/publish.py --write` from its own measurements (do not edit by "
        "hand); `bench/run.py --write` keeps this section.",
        "",
        f"- Date: {date}. Command: `.venv/bin/python bench/publish.py --rounds {rounds} "
        f"--messages {messages} --write`",
        f"- {messages:,} persistent 100-byte messages per run to a fresh durable queue, each "
        f"confirmed by the broker (mandatory where the library allows); {rounds} rounds, the "
        "order of the frameworks rotating; the queue checked to hold them all.",
        "- P1: one at a time, each publish waiting for its confirm. P2: "
        f"{WINDOW} publishes in flight. Blocking pika has only P1.",
        f"- Versions: {shown}.",
        "",
        "| mode | framework | median msg/s | spread (min-max) | x pika P1 |",
        "|---|---|---:|---:|---:|",
    ]
    for framework, mode in RUNS:
        rates = results[(framework, mode)]
        median = statistics.median(rates)
        lines.append(
            f"| {mode} | {LABELS.get(framework, framework)} | {median:,.0f} | "
            f"{min(rates):,.0f}-{max(rates):,.0f} | {median / baseline:.2f}x |"
        )
    lines.append(END)
    return "\n".join(lines) + "\n"


def write(section: str) -> None:
    text = BENCHMARKS_MD.read_text()
    if BEGIN in text:
        before, _, rest = text.partition(BEGIN)
        _, _, after = rest.partition(END + "\n")
        text = before + section + after
    else:
        anchor = "\n## Where the time goes"
        head, found, tail = text.partition(anchor)
        text = head.rstrip("\n") + "\n\n" + section + (found + tail if found else "")
    BENCHMARKS_MD.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--child", nargs=4, metavar=("FRAMEWORK", "MODE", "QUEUE", "N"))
    args = parser.parse_args()
    if args.child:
        framework, mode, queue, messages = args.child
        print(child(framework, mode, queue, int(messages)))
        return
    results: dict[tuple[str, str], list[float]] = {run: [] for run in RUNS}
    for round_number in range(args.rounds):
        shift = round_number % len(RUNS)
        for framework, mode in RUNS[shift:] + RUNS[:shift]:
            rate = measure(framework, mode, args.messages)
            results[(framework, mode)].append(rate)
            print(f"round {round_number + 1}: {mode} {framework}: {rate:,.0f} msg/s", flush=True)
    section = render(results, args.messages, args.rounds)
    print(section)
    if args.write:
        write(section)


if __name__ == "__main__":
    main()
