"""The benchmark suite: steadyrabbit against raw pika, aio-pika, FastStream and dramatiq.

    .venv/bin/python bench/run.py                    # everything: W1-W5, 3 rounds, every peer
    .venv/bin/python bench/run.py --workload W1 --rounds 1 --messages 5000
    .venv/bin/python bench/run.py --write            # and (re)write BENCHMARKS.md
    .venv/bin/python bench/run.py --workload W1,W2 --rounds 1   # and what idempotency costs

For each round, for each workload, every framework runs once, in a rotating order. Each run is
its own process (``bench/_child.py``) consuming a fresh queue that this process filled (with
publisher confirms) and checks empty afterwards; the child times from the first handler start
to the last ack and reports its peak RSS. See BENCHMARKS.md for the method and the results.

W1 and W2 also run steadyrabbit on messages that each carry a unique ``message_id``, with
idempotency on (the default: a lease and a done record per message) and off, so that the cost
of the ``Leases`` middleware stands beside the other rows of the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika

import _broker

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
DEFAULT_URL = os.environ.get("STEADYRABBIT_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
QUEUE_PREFIX = "steadyrabbit-bench"
# steadyrabbit+ids+on / +off: steadyrabbit on messages with a message_id each, idempotency on
# (the default) / off. Only in the workloads of ID_WORKLOADS.
IDS_ON = "steadyrabbit+ids+on"
IDS_OFF = "steadyrabbit+ids+off"
# steadyrabbit+defaults / pika+defaults: each at its own defaults, no concurrency or prefetch
# given (steadyrabbit: 16 tasks for an async handler, 1 thread for a sync one, the adaptive
# window; pika: no basic.qos, the handler in its callback, one message at a time). W1-W4 (W5
# is about a prefetch of 10,000).
SR_DEFAULTS = "steadyrabbit+defaults"
PIKA_DEFAULTS = "pika+defaults"
DEFAULT_FRAMEWORKS = (SR_DEFAULTS, PIKA_DEFAULTS)
DEFAULT_WORKLOADS = ("W1", "W2", "W3", "W4")
# At the defaults a sleeping handler runs with few slots: fewer messages keep those runs short
# (steadyrabbit's W2: 16 slots, about 300 msg/s; W3: 1 thread, about 20 msg/s).
DEFAULTS_SLEEP_MESSAGES = {"async_sleep": 2_000, "sync_sleep": 200}
# pika+batched-acks: raw pika at p100 acking every 50th delivery with multiple=True, the
# cheapest raw pika consumer: the CPU reference. Only in W1.
PIKA_BATCHED = "pika+batched-acks"
FRAMEWORKS = (
    "steadyrabbit",
    IDS_ON,
    IDS_OFF,
    SR_DEFAULTS,
    "pika",
    PIKA_DEFAULTS,
    PIKA_BATCHED,
    "aio-pika",
    "aio-pika+uvloop",
    "faststream",
    "dramatiq",
)
ID_FRAMEWORKS = {IDS_ON: True, IDS_OFF: False}  # -> Settings(idempotency=...)
ID_WORKLOADS = ("W1", "W2")
LABELS = {
    IDS_ON: "steadyrabbit, ids, idempotency on",
    IDS_OFF: "steadyrabbit, ids, idempotency off",
    SR_DEFAULTS: "steadyrabbit at its defaults",
    PIKA_DEFAULTS: "pika at its defaults",
    PIKA_BATCHED: "pika, batched acks",
}
BASELINE = "pika"
PIKA_SEQUENTIAL_MESSAGES = 100
# W5 passes if RSS at 100 % of the messages is at most this much above RSS at 50 %.
FLAT_TOLERANCE_SHARE = 0.05
FLAT_TOLERANCE_MB = 3.0


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    messages: int  # the full size; the default run uses DEFAULT_MESSAGES
    prefetch: int
    concurrency: int
    handler: str  # noop | async_sleep | sync_sleep | json
    body: str = "bytes"  # bytes: 100 bytes | json: a 1 KB JSON object
    sleep: float = 0.0
    rss_marks: tuple[float, ...] = ()

    @property
    def ideal(self) -> float | None:
        """Messages per second if every handler slot were always busy (sleep workloads)."""
        return self.concurrency / self.sleep if self.sleep else None


WORKLOADS = {
    w.name: w
    for w in (
        Workload("W1", "no-op handler, 100-byte bodies", 50_000, 100, 100, "noop"),
        Workload(
            "W2",
            "async I/O handler: await asyncio.sleep(0.05)",
            10_000,
            100,
            100,
            "async_sleep",
            sleep=0.05,
        ),
        Workload(
            "W3",
            "blocking handler: time.sleep(0.05) in 32 threads",
            5_000,
            32,
            32,
            "sync_sleep",
            sleep=0.05,
        ),
        Workload("W4", "1 KB JSON bodies, decoded", 50_000, 100, 100, "json", body="json"),
        Workload(
            "W5",
            "bounded memory: prefetch 10000, no-op handler",
            200_000,
            10_000,
            100,
            "noop",
            rss_marks=(0.25, 0.5, 0.9),
        ),
    )
}
# A full run at the sizes above (W1 and W4 50k, W5 200k, 3 rounds of everything) takes about
# FULL_RUN_MINUTES on the 2-core reference machine, so the default run is smaller: about
# DEFAULT_RUN_MINUTES. --full restores them.
DEFAULT_MESSAGES = {"W1": 25_000, "W2": 10_000, "W3": 5_000, "W4": 25_000, "W5": 200_000}
DEFAULT_W5_ROUNDS = 1
FULL_RUN_MINUTES = 29
DEFAULT_RUN_MINUTES = 15


def display_name(framework: str) -> str:
    """A framework's name in the tables."""
    return LABELS.get(framework, framework)


def frameworks_for(workload: Workload, frameworks: Sequence[str]) -> list[str]:
    """The frameworks that run ``workload``: the message_id variants only in ID_WORKLOADS."""
    return [
        f
        for f in frameworks
        if (f not in ID_FRAMEWORKS or workload.name in ID_WORKLOADS)
        and (f not in DEFAULT_FRAMEWORKS or workload.name in DEFAULT_WORKLOADS)
        and (f != PIKA_BATCHED or workload.name == "W1")
    ]


@dataclass
class Measurement:
    framework: str
    workload: str
    round: int
    messages: int
    ok: bool
    msg_per_s: float | None = None
    peak_rss_mb: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "framework": self.framework,
            "workload": self.workload,
            "round": self.round,
            "msg_per_s": _round(self.msg_per_s, 1),
            "peak_rss_mb": _round(self.peak_rss_mb, 1),
            "messages": self.messages,
            "ok": self.ok,
            "error": self.error,
            **self.extra,
        }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# -- bodies -----------------------------------------------------------------------------------


def _text(length: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choices(string.ascii_letters + string.digits, k=length))


def json_document() -> dict[str, Any]:
    """A realistic ~1 KB JSON object (exactly 1024 bytes encoded)."""
    doc: dict[str, Any] = {
        "id": 123456,
        "type": "purchasing.contract",
        "created_at": "2024-05-01T12:00:00Z",
        "customer": {"id": 42, "name": "ACME Corporation", "country": "DE", "vip": False},
        "lines": [
            {"sku": f"SKU-{i:05d}", "quantity": i + 1, "price": 9.99 + i, "tags": ["a", "b"]}
            for i in range(6)
        ],
        "note": "",
    }
    size = len(json.dumps(doc, separators=(",", ":")).encode())
    doc["note"] = _text(1024 - size, 7)
    return doc


BODY_TEXT = _text(100, 1)
BODY_BYTES = BODY_TEXT.encode()
JSON_DOC = json_document()
JSON_BYTES = json.dumps(JSON_DOC, separators=(",", ":")).encode()


def bodies_for(framework: str, workload: Workload, queue: str) -> Iterator[bytes]:
    """What the parent publishes: the same bodies for every framework but dramatiq, which only
    consumes its own envelope (the payload becomes the actor's single argument)."""
    if framework == "dramatiq":
        import dramatiq
        from consumers.dramatiq_consumer import ACTOR_NAME

        payload: Any = JSON_DOC if workload.body == "json" else BODY_TEXT

        def encoded() -> Iterator[bytes]:
            while True:
                message = dramatiq.Message(
                    queue_name=queue,
                    actor_name=ACTOR_NAME,
                    args=(payload,),
                    kwargs={},
                    options={},
                )
                yield message.encode()

        return encoded()
    return _broker.repeat(JSON_BYTES if workload.body == "json" else BODY_BYTES)


def properties_for(
    framework: str, workload: Workload
) -> pika.BasicProperties | Iterator[pika.BasicProperties]:
    """The same properties for every message; for the message_id variants, a fresh
    ``message_id`` (a UUID) each."""
    if framework == "dramatiq" or workload.body == "json":
        properties = pika.BasicProperties(delivery_mode=1, content_type="application/json")
    else:
        properties = pika.BasicProperties(delivery_mode=1)
    if framework in ID_FRAMEWORKS:
        return _broker.with_message_ids(properties)
    return properties


# -- one measurement --------------------------------------------------------------------------


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.url: str = args.url
        self.run_id = f"{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.created: set[str] = set()
        self.tmp = Path(tempfile.mkdtemp(prefix="steadyrabbit-bench-"))

    def queues_of(self, framework: str, queue: str) -> list[str]:
        if framework.startswith("steadyrabbit"):
            return [queue, f"{queue}.dlq"]  # steadyrabbit declares the dead-letter queue
        if framework == "dramatiq":
            return [queue, f"{queue}.DQ", f"{queue}.XQ"]  # dramatiq's delay and dead queues
        return [queue]

    def declare(self, framework: str, queue: str) -> None:
        self.created.update(self.queues_of(framework, queue))
        if framework == "dramatiq":
            from dramatiq.brokers.rabbitmq import RabbitmqBroker

            broker = RabbitmqBroker(url=self.url)
            try:
                broker.declare_queue(queue, ensure=True)
            finally:
                broker.close()
        else:
            _broker.declare(self.url, queue)

    def cleanup(self, queues: Iterable[str]) -> None:
        queues = list(queues)
        _broker.delete(self.url, queues)
        self.created.difference_update(queues)

    def child_timeout(self, messages: int) -> float:
        if self.args.child_timeout:
            return float(self.args.child_timeout)
        return 60.0 + messages / 250.0

    def measure(self, framework: str, workload: Workload, round_: int) -> Measurement:
        messages = self.args.messages_for[workload.name]
        extra: dict[str, Any] = {}
        sleeps = workload.handler in DEFAULTS_SLEEP_MESSAGES
        if (framework == BASELINE and workload.handler == "async_sleep") or (
            framework == PIKA_DEFAULTS and sleeps
        ):
            messages = min(messages, self.args.pika_sequential_messages)
            extra["mode"] = "sequential"
        elif framework == SR_DEFAULTS and sleeps:
            messages = min(messages, DEFAULTS_SLEEP_MESSAGES[workload.handler])
        slug = framework.replace("+", "-")
        queue = f"{QUEUE_PREFIX}.{self.run_id}.{workload.name}.{slug}.r{round_}"
        timeout = self.child_timeout(messages)
        spec = {
            "framework": framework,
            "workload": workload.name,
            "url": self.url,
            "queue": queue,
            "messages": messages,
            "prefetch": workload.prefetch,
            "concurrency": workload.concurrency,
            "handler": workload.handler,
            "sleep": workload.sleep,
            "rss_marks": list(workload.rss_marks),
            "timeout": timeout,
            "mode": extra.get("mode"),
            "loop": "uvloop" if framework.endswith("+uvloop") else "asyncio",
            "result_file": str(self.tmp / f"{queue}.json"),
        }
        if framework in ID_FRAMEWORKS:
            spec["idempotency"] = ID_FRAMEWORKS[framework]
        if framework in DEFAULT_FRAMEWORKS:
            spec["defaults"] = True
        if framework == PIKA_BATCHED:
            spec["batched_acks"] = True
        measurement = Measurement(framework, workload.name, round_, messages, ok=False)
        try:
            self.declare(framework, queue)
            fill_s = _broker.fill(
                self.url,
                queue,
                bodies_for(framework, workload, queue),
                messages,
                properties_for(framework, workload),
                timeout=max(60.0, messages / 2000),
            )
            self.check_depth(queue, messages, "before the run")
            extra["fill_s"] = round(fill_s, 2)
            result = self.run_child(spec, timeout)
            self.check_depth(queue, 0, "after the run (unacked messages went back)")
            self.check_records(framework, result, messages)
        except (RuntimeError, OSError, pika.exceptions.AMQPError) as exc:
            measurement.error = str(exc) or type(exc).__name__
        else:
            measurement.ok = True
            measurement.msg_per_s = result.pop("msg_per_s")
            measurement.peak_rss_mb = result.pop("peak_rss_mb")
            result.pop("messages", None)
            extra.update(result)
        finally:
            self.cleanup(self.queues_of(framework, queue))
        measurement.extra = _rounded(extra)
        return measurement

    def check_depth(self, queue: str, expected: int, when: str) -> None:
        ready = _broker.wait_depth(self.url, queue, expected, timeout=30 if expected else 5)
        if ready != expected:
            raise RuntimeError(f"{ready} messages in the queue {when}, not {expected}")

    @staticmethod
    def check_records(framework: str, result: dict[str, Any], messages: int) -> None:
        """With ids and idempotency on, every message went through the lease store: one done
        record each (otherwise the run measured the pass-through, not the store)."""
        if framework == IDS_ON and result.get("done_records") != messages:
            raise RuntimeError(
                f"{result.get('done_records')} done records in the lease store, not {messages}"
            )

    def run_child(self, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        log_path = self.tmp / f"{spec['queue']}.log"
        result_path = Path(spec["result_file"])
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, str(BENCH_DIR / "_child.py"), json.dumps(spec)],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                code = process.wait(timeout + 30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                code = None
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise
        if code != 0 or not result_path.exists():
            tail = log_path.read_text(errors="replace").strip().splitlines()[-6:]
            why = "killed after the hard timeout" if code is None else f"exit status {code}"
            raise RuntimeError(f"child failed ({why}): " + " | ".join(tail))
        result: dict[str, Any] = json.loads(result_path.read_text())
        return result


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, float):
            out[key] = round(value, 3)
        elif isinstance(value, dict):
            out[key] = _rounded(value)
        else:
            out[key] = value
    return out


# -- summary ----------------------------------------------------------------------------------


@dataclass
class Row:
    workload: Workload
    framework: str
    rates: list[float]
    peak_rss: float | None
    failures: int
    mode: str | None
    runs: list[Measurement]

    @property
    def median(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None

    @property
    def cpu(self) -> float | None:
        """Median CPU seconds (every thread of the consumer process) per 10,000 messages."""
        values = [
            m.extra["cpu_s_per_10k"]
            for m in self.runs
            if m.ok and m.extra.get("cpu_s_per_10k") is not None
        ]
        return statistics.median(values) if values else None


def summarize(
    measurements: Sequence[Measurement], workloads: Sequence[Workload], frameworks: Sequence[str]
) -> list[Row]:
    rows = []
    for workload in workloads:
        for framework in frameworks:
            runs = [
                m for m in measurements if m.workload == workload.name and m.framework == framework
            ]
            if not runs:
                continue
            good = [m for m in runs if m.ok and m.msg_per_s]
            rss = [m.peak_rss_mb for m in good if m.peak_rss_mb is not None]
            rows.append(
                Row(
                    workload=workload,
                    framework=framework,
                    rates=sorted(m.msg_per_s for m in good if m.msg_per_s),
                    peak_rss=max(rss) if rss else None,
                    failures=len(runs) - len(good),
                    mode=next((m.extra.get("mode") for m in good if m.extra.get("mode")), None),
                    runs=runs,
                )
            )
    return rows


def _median_of(rows: Sequence[Row], workload: str, framework: str) -> float | None:
    for row in rows:
        if row.workload.name == workload and row.framework == framework:
            return None if row.mode == "sequential" else row.median
    return None


def _fmt_rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def results_table(rows: Sequence[Row]) -> str:
    lines = [
        "| workload | framework | median msg/s | spread (min-max) | x raw pika | % of ideal "
        "| CPU s / 10k msgs | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        workload = row.workload
        median = row.median
        if median is None:
            rate = f"failed ({row.failures}x)"
            spread = "-"
        else:
            rate = _fmt_rate(median)
            spread = f"{_fmt_rate(row.rates[0])}-{_fmt_rate(row.rates[-1])}"
            if row.failures:
                spread += f" ({row.failures} failed)"
        baseline = _median_of(rows, workload.name, BASELINE)
        if row.mode == "sequential":
            rate = f"n/a (sequential: {_fmt_rate(median)})"
            ratio = "n/a"
        elif median is not None and baseline:
            ratio = f"{median / baseline:.2f}x"
        else:
            ratio = "n/a" if workload.handler == "async_sleep" else "-"
        if workload.ideal and median is not None:
            ideal = f"{100 * median / workload.ideal:.1f} %"
            if row.mode == "sequential":
                ideal = f"({ideal})"
        else:
            ideal = ""
        peak = f"{row.peak_rss:.1f}" if row.peak_rss is not None else "-"
        cpu = f"{row.cpu:.2f}" if row.cpu is not None else "-"
        lines.append(
            f"| {workload.name} | {display_name(row.framework)} | {rate} | {spread} | {ratio} "
            f"| {ideal} | {cpu} | {peak} |"
        )
    return "\n".join(lines)


def _flat_tolerance(rss_50: float) -> float:
    return max(FLAT_TOLERANCE_MB, FLAT_TOLERANCE_SHARE * rss_50)


def memory_rows(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """W5: RSS at 25/50/100 % (medians over rounds) and the worst growth from 50 to 100 %."""
    out = []
    for row in rows:
        if not row.workload.rss_marks:
            continue
        marks: dict[str, list[float]] = {"25%": [], "50%": [], "90%": [], "100%": []}
        growths = []
        for run in row.runs:
            rss = run.extra.get("rss_mb") or {}
            if not run.ok:
                continue
            for key, values in marks.items():
                if key in rss:
                    values.append(rss[key])
            if "50%" in rss and "100%" in rss:
                # At 100 % the prefetch window has drained; at 90 % it is still full.
                late = max(rss["100%"], rss.get("90%", rss["100%"]))
                growths.append((late - rss["50%"], rss["50%"]))
        worst = max(growths, default=None)
        out.append(
            {
                "framework": row.framework,
                "marks": {k: statistics.median(v) if v else None for k, v in marks.items()},
                "peak": row.peak_rss,
                "growth": worst[0] if worst else None,
                "flat": None if worst is None else worst[0] <= _flat_tolerance(worst[1]),
                "tolerance": None if worst is None else _flat_tolerance(worst[1]),
            }
        )
    return out


def memory_table(rows: Sequence[Row]) -> str:
    mem = memory_rows(rows)
    if not mem:
        return ""
    lines = [
        "| framework | RSS @25 % | RSS @50 % | RSS @90 % | RSS @100 % | peak "
        "| growth from 50 % (worst round) | flat? |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for item in mem:
        marks = item["marks"]

        def mb(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f}"

        if item["flat"] is None:
            verdict = "-"
        else:
            verdict = "yes" if item["flat"] else "no"
            verdict += f" (tolerance {item['tolerance']:.1f} MB)"
        growth = "-" if item["growth"] is None else f"{item['growth']:+.1f} MB"
        lines.append(
            f"| {item['framework']} | {mb(marks['25%'])} | {mb(marks['50%'])} "
            f"| {mb(marks['90%'])} | {mb(marks['100%'])} | {mb(item['peak'])} | {growth} "
            f"| {verdict} |"
        )
    return "\n".join(lines)


def idempotency_table(rows: Sequence[Row]) -> str:
    """W1 and W2 on messages with a message_id each: idempotency off against on, beside
    steadyrabbit without ids and raw pika (W1) of the same run."""
    lines = [
        "| workload | steadyrabbit, no ids | ids, idempotency off | ids, idempotency on "
        "| on / off | cost per message | x raw pika (off → on) | % of ideal (off → on) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    found = False
    for name in ID_WORKLOADS:
        workload = WORKLOADS[name]
        on = _median_of(rows, name, IDS_ON)
        off = _median_of(rows, name, IDS_OFF)
        if on is None and off is None:
            continue
        found = True
        plain = _median_of(rows, name, "steadyrabbit")
        pika_rate = _median_of(rows, name, BASELINE)
        share = cost = vs_pika = vs_ideal = "-"
        if on is not None and off is not None:
            share = f"{on / off:.2f}x ({100 * (on / off - 1):+.0f} %)"
            cost = f"{1e6 * (1 / on - 1 / off):+.1f} µs"

        def ratio(rate: float | None, base: float | None) -> str:
            return "-" if rate is None or not base else f"{rate / base:.2f}x"

        def percent(rate: float | None, base: float) -> str:
            return "-" if rate is None else f"{100 * rate / base:.1f} %"

        if workload.ideal:
            vs_ideal = f"{percent(off, workload.ideal)} → {percent(on, workload.ideal)}"
        if pika_rate:
            vs_pika = f"{ratio(off, pika_rate)} → {ratio(on, pika_rate)}"
        elif workload.handler == "async_sleep":
            vs_pika = "n/a"
        lines.append(
            f"| {name} | {_fmt_rate(plain)} | {_fmt_rate(off)} | {_fmt_rate(on)} | {share} "
            f"| {cost} | {vs_pika} | {vs_ideal} |"
        )
    return "\n".join(lines) if found else ""


def defaults_table(rows: Sequence[Row]) -> str:
    """Each workload with both libraries at their defaults, side by side."""
    lines = [
        "| workload | steadyrabbit at its defaults | pika at its defaults | ratio "
        "| steadyrabbit tuned (this run) |",
        "|---|---:|---:|---:|---:|",
    ]
    found = False
    for name in DEFAULT_WORKLOADS:
        by_framework = {
            row.framework: row.median
            for row in rows
            if row.workload.name == name and row.framework in (*DEFAULT_FRAMEWORKS, "steadyrabbit")
        }
        ours, theirs = by_framework.get(SR_DEFAULTS), by_framework.get(PIKA_DEFAULTS)
        if ours is None and theirs is None:
            continue
        found = True
        ratio = f"{ours / theirs:.2f}x" if ours and theirs else "-"
        lines.append(
            f"| {name} | {_fmt_rate(ours)} | {_fmt_rate(theirs)} | {ratio} "
            f"| {_fmt_rate(by_framework.get('steadyrabbit'))} |"
        )
    return "\n".join(lines) if found else ""


# What a perfect consumer could do on this machine: the same number of slots sleeping the
# same time in a loop, with no broker and no framework. Filled by calibrate() in main().
CEILINGS: dict[str, float] = {}


def calibrate(workload: Workload, seconds: float = 3.0) -> float:
    """Messages per second of ``workload.concurrency`` slots that only sleep ``workload.sleep``
    (asyncio.sleep on uvloop for async workloads, time.sleep in threads for sync ones)."""
    import asyncio
    import threading

    import uvloop

    deadline = time.monotonic() + seconds
    count = 0
    lock = threading.Lock()
    if workload.handler == "async_sleep":

        async def slot() -> None:
            nonlocal count
            while time.monotonic() < deadline:
                await asyncio.sleep(workload.sleep)
                count += 1

        async def all_slots() -> None:
            await asyncio.gather(*(slot() for _ in range(workload.concurrency)))

        began = time.monotonic()
        uvloop.run(all_slots())
    else:

        def thread_slot() -> None:
            nonlocal count
            while time.monotonic() < deadline:
                time.sleep(workload.sleep)
                with lock:
                    count += 1

        began = time.monotonic()
        threads = [threading.Thread(target=thread_slot) for _ in range(workload.concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return count / (time.monotonic() - began)


def targets(rows: Sequence[Row]) -> list[str]:
    """The project's targets, PASS or MISS, computed from the medians."""
    lines = []

    def ratio_target(
        peer: str, goal: float, note: str = "", framework: str = "steadyrabbit", what: str = ""
    ) -> None:
        sr_w1 = _median_of(rows, "W1", framework)
        peer_rate = _median_of(rows, "W1", peer)
        label = f"W1{what} ≥ {goal:g}x {peer}{note}"
        if sr_w1 is None or peer_rate is None:
            lines.append(f"- {label}: **not measured** in this run")
            return
        ratio = sr_w1 / peer_rate
        numbers = f"{_fmt_rate(sr_w1)} vs {_fmt_rate(peer_rate)} msg/s = {ratio:.2f}x"
        if ratio >= goal:
            lines.append(f"- {label}: **PASS** ({numbers})")
        else:
            short = 100 * (1 - ratio / goal)
            lines.append(
                f"- {label}: **MISS** ({numbers}; {short:.0f} % short, steadyrabbit needs "
                f"{_fmt_rate(goal * peer_rate)} msg/s)"
            )

    def cpu_target() -> None:
        cpu = {
            row.framework: row.cpu
            for row in rows
            if row.workload.name == "W1" and row.framework in ("steadyrabbit", PIKA_BATCHED)
        }
        ours, reference = cpu.get("steadyrabbit"), cpu.get(PIKA_BATCHED)
        label = "W1 CPU per message ≤ raw pika's with batched acks (the cheapest pika consumer)"
        if ours is None or reference is None:
            lines.append(f"- {label}: **not measured** in this run")
            return
        verdict = "PASS" if ours <= reference else "MISS"
        lines.append(
            f"- {label}: **{verdict}** ({ours:.2f} vs {reference:.2f} s per 10,000 messages "
            f"= {ours / reference:.2f}x)"
        )

    ratio_target("pika", 1.5, " (raw pika)")
    ratio_target("pika", 1.5, " (raw pika)", IDS_ON, " with ids and idempotency on")
    ratio_target("pika", 2.0, " (raw pika, p100/c100 both)", "steadyrabbit", " at p100/c100")
    ratio_target(PIKA_DEFAULTS, 1.0, " (each at its defaults)", SR_DEFAULTS, " at the defaults")
    cpu_target()
    ratio_target("aio-pika", 3.0)
    ratio_target("aio-pika+uvloop", 3.0, " (stricter: the same event loop as steadyrabbit)")
    for name in ("W2", "W3"):
        workload = WORKLOADS[name]
        median = _median_of(rows, name, "steadyrabbit")
        label = f"{name} ≥ 95 % of ideal ({workload.ideal:,.0f} msg/s)"
        if median is None or workload.ideal is None:
            lines.append(f"- {label}: **not measured** in this run")
            continue
        share = 100 * median / workload.ideal
        numbers = f"{_fmt_rate(median)} msg/s = {share:.1f} %"
        ceiling = CEILINGS.get(name)
        if ceiling:
            numbers += (
                f"; this machine's own ceiling, slots that only sleep with no broker, is "
                f"{_fmt_rate(ceiling)} msg/s = {100 * ceiling / workload.ideal:.1f} % of ideal, "
                f"so steadyrabbit reaches {100 * median / ceiling:.1f} % of what is achievable here"
            )
        if share >= 95:
            lines.append(f"- {label}: **PASS** ({numbers})")
        else:
            lines.append(f"- {label}: **MISS** ({numbers}; {95 - share:.1f} points short)")
    flat = next((m for m in memory_rows(rows) if m["framework"] == "steadyrabbit"), None)
    label = "W5 RSS flat (RSS @90 % and @100 % ≤ RSS @50 % + max(3 MB, 5 %), every round)"
    if flat is None or flat["flat"] is None:
        lines.append(f"- {label}: **not measured** in this run")
    else:
        numbers = (
            f"{flat['marks']['50%']:.1f} → {flat['marks']['100%']:.1f} MB (medians), worst growth "
            f"{flat['growth']:+.1f} MB, tolerance {flat['tolerance']:.1f} MB"
        )
        if flat["flat"]:
            lines.append(f"- {label}: **PASS** ({numbers})")
        else:
            over = flat["growth"] - flat["tolerance"]
            lines.append(f"- {label}: **MISS** ({numbers}; {over:.1f} MB over)")
    return lines


# -- environment ------------------------------------------------------------------------------

PACKAGES = ("pika", "aio-pika", "aiormq", "faststream", "dramatiq", "uvloop", "steadyrabbit")


def versions(url: str) -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    found["RabbitMQ"] = rabbitmq_version(url)
    return found


def rabbitmq_version(url: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["rabbitmqctl", "version"], capture_output=True, text=True, timeout=30, check=False
        )
        lines = done.stdout.strip().splitlines()
        if done.returncode == 0 and lines:
            return f"{lines[-1].strip()} (rabbitmqctl version)"
    version = _broker.server_version(url)
    return f"{version} (server properties)" if version else "unknown"


def source_state() -> str:
    """The commit steadyrabbit was measured at, and whether src/ had uncommitted changes."""

    def git(*argv: str) -> str:
        done = subprocess.run(
            ["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
        )
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "src")
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    if dirty:
        return f"commit {commit} plus uncommitted changes in src/"
    return f"commit {commit}, src/ unchanged"


def machine() -> dict[str, str]:
    info = {"cores": str(os.cpu_count()), "kernel": f"{platform.system()} {platform.release()}"}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["ram"] = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    return info


# -- BENCHMARKS.md ----------------------------------------------------------------------------

WHERE_HEADING = "## Where the time goes"
WHERE_PLACEHOLDER = (
    "_To be filled in by the main engineer from a profile of the W1 steadyrabbit consumer "
    "(pyinstrument comes with the `bench` extra). No profile results are claimed here yet._"
)


def _kept_section(heading: str) -> str | None:
    """The body of a section of the current BENCHMARKS.md, kept across rewrites."""
    if not BENCHMARKS_MD.exists():
        return None
    text = BENCHMARKS_MD.read_text()
    start = text.find(heading + "\n")
    if start < 0:
        return None
    body = text[start + len(heading) + 1 :]
    end = body.find("\n## ")
    body = body if end < 0 else body[:end]
    return body.strip() or None


PUBLISH_BEGIN, PUBLISH_END = "<!-- publish:begin -->", "<!-- publish:end -->"


def _kept_publishing() -> str | None:
    """The section bench/publish.py writes, kept as it is."""
    if not BENCHMARKS_MD.exists():
        return None
    text = BENCHMARKS_MD.read_text()
    start, end = text.find(PUBLISH_BEGIN), text.find(PUBLISH_END)
    return text[start : end + len(PUBLISH_END)] if 0 <= start < end else None


def write_benchmarks(args: argparse.Namespace, rows: Sequence[Row], run: dict[str, Any]) -> None:
    env: dict[str, str] = run["versions"]
    box: dict[str, str] = run["machine"]
    command = ".venv/bin/python bench/run.py " + " ".join(shlex.quote(a) for a in args.argv)
    workloads = [WORKLOADS[name] for name in args.workloads]
    sizes = ", ".join(f"{w.name} {args.messages_for[w.name]:,}" for w in workloads)
    reduced = [w for w in workloads if args.messages_for[w.name] < w.messages] or (
        "W5" in args.workloads and args.w5_rounds < args.rounds
    )
    rounds = f"{args.rounds}"
    if "W5" in args.workloads and args.w5_rounds != args.rounds:
        rounds += f" (W5: {args.w5_rounds})"
    where = _kept_section(WHERE_HEADING) or WHERE_PLACEHOLDER
    load = run["load"]
    parts = [
        "# Benchmarks",
        "",
        "Written by `bench/run.py --write` from its own measurements: do not edit the numbers "
        "by hand. Rerun the command below to refresh them (the sections *Publishing with "
        "confirms*, written by `bench/publish.py`, and *Where the time goes* are kept across "
        "rewrites).",
        "",
        f"- Date: {run['started']:%Y-%m-%d %H:%M} UTC; the run took "
        f"{run['duration_s'] / 60:.1f} min.",
        f"- Command: `{command.strip()}`",
        f"- Rounds: {rounds}; messages per run: {sizes}; frameworks: {', '.join(args.frameworks)}.",
        f"- steadyrabbit measured from its working tree: {run['source']}.",
        f"- Load average (1 min) when the run started / ended: {load[0]} / {load[1]}. Other "
        "work on the machine (test suites, say) shares its 2 cores with the broker and the "
        "consumer; the interleaved rounds spread such noise over every framework.",
    ]
    if reduced:
        full = ", ".join(f"{w.name} {w.messages:,}" for w in WORKLOADS.values())
        default = ", ".join(f"{name} {count:,}" for name, count in DEFAULT_MESSAGES.items())
        parts += [
            "",
            f"**Smaller than the full sizes** ({full}, every round of W5). A full run takes "
            f"about {FULL_RUN_MINUTES} minutes on this 2-core machine, so the default run is "
            f"smaller ({default}, one round of W5), about {DEFAULT_RUN_MINUTES} minutes. The "
            "full sizes: "
            "`.venv/bin/python bench/run.py --full --write`.",
        ]
    parts += [
        "",
        "## Setup",
        "",
        "| | version |",
        "|---|---|",
        *[f"| {name} | {version} |" for name, version in env.items()],
        "",
        f"Machine: {box.get('cores', '?')} cores, {box.get('ram', '?')} RAM, "
        f"{box.get('cpu', 'unknown CPU')}, {box.get('kernel', '')}. The broker runs on the same "
        "machine as the consumers (they share the cores). Broker URL: the local "
        f"`{_mask(args.url)}`.",
        "",
        "## Results",
        "",
        results_table(rows),
        "",
        "msg/s: messages divided by the time from the first handler start to the last ack, "
        "median over the rounds, with the slowest and fastest round. x raw pika: the median "
        "against raw pika's median for the same workload. % of ideal: against "
        "concurrency / handler latency (W2: 100 / 0.05 s = 2,000 msg/s; W3: 32 / 0.05 s = "
        "640 msg/s). Peak RSS: the highest of the rounds (VmHWM of the consumer's process).",
        "",
    ]
    at_defaults = defaults_table(rows)
    if at_defaults:
        parts += [
            "### At the defaults",
            "",
            at_defaults,
            "",
            "Each library as a new user runs it, no concurrency or prefetch given: "
            "steadyrabbit runs an async handler as 16 tasks and a sync one in 1 thread, with "
            "the adaptive prefetch window; raw pika sends no `basic.qos` (an unlimited "
            "prefetch) and runs the handler in its callback, one message at a time. With "
            "sleeping handlers (W2, W3) the runs are shorter (steadyrabbit: W2 2,000, W3 200 "
            "messages; pika: 100). Tuned: steadyrabbit's row in the table above (W1, W4: "
            "prefetch and concurrency 100; W2: 100 tasks; W3: 32 threads).",
            "",
        ]
    cost = idempotency_table(rows)
    if cost:
        parts += [
            "### Idempotency cost: messages with a message_id",
            "",
            cost,
            "",
            "Idempotency is on by default, but the main rows' messages carry no `message_id`, "
            "so the `Leases` middleware lets them through. Here the same W1 and W2 messages "
            "carry a unique `message_id` each (a UUID): with idempotency on (the default "
            "settings) each takes a lease in the SQLite store before its handler and writes a "
            "done record after it, both written behind the message (up to 100 ms of writes "
            "gathered into one transaction; a run that ends before its lease is written costs "
            "one row), "
            "in the run's own fresh `state_dir`; off is `Settings(idempotency=False)` on the "
            "same messages. "
            "Medians over the rounds of this run. Cost per message: 1 / on - 1 / off, the time "
            "idempotency adds to the run per message (W1: mostly CPU; W2, whose 100 handlers "
            "mostly wait: each handler slot's added time divided by 100). x raw pika: against "
            "raw pika's W1 median (W2: n/a, see above).",
            "",
        ]
    memory = memory_table(rows)
    if memory:
        parts += [
            "### W5: memory while consuming with a 10,000-message prefetch window",
            "",
            memory,
            "",
            "RSS (VmRSS) sampled by the consumer when 25 %, 50 %, 90 % and 100 % of the "
            "messages were handled (medians over the rounds). Until about 95 % the "
            "10,000-message window is full; at 100 % it has drained, which alone can lower RSS, "
            "so 90 % is checked too. Flat: RSS at 90 % and at 100 % is at most "
            f"max({FLAT_TOLERANCE_MB:g} MB, {FLAT_TOLERANCE_SHARE:.0%} of RSS at 50 %) above "
            "RSS at 50 %, in every round.",
            "",
        ]
    parts += [
        "## Targets",
        "",
        *targets(rows),
        "",
        "## Method",
        "",
        METHOD,
        "",
        *([publishing, ""] if (publishing := _kept_publishing()) else []),
        WHERE_HEADING,
        "",
        where,
        "",
        "## Reproduce",
        "",
        "```sh",
        ".venv/bin/pip install -e '.[bench,speed]'             # the peers, and uvloop",
        ".venv/bin/python bench/run.py --write                # defaults: about "
        f"{DEFAULT_RUN_MINUTES} min",
        f".venv/bin/python bench/run.py --full --write         # full sizes: about "
        f"{FULL_RUN_MINUTES} min",
        ".venv/bin/python bench/run.py --workload W5 --w5-messages 1000000 --rounds 1",
        ".venv/bin/python bench/run.py --workload W1 --rounds 1 --messages 5000   # a quick look",
        ".venv/bin/python bench/run.py --json > results.jsonl       # one JSON object per run",
        "```",
        "",
    ]
    BENCHMARKS_MD.write_text("\n".join(parts))


def _mask(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        creds, _, host = rest.rpartition("@")
        user = creds.split(":", 1)[0]
        return f"{scheme}{sep}{user}:****@{host}"
    return url


METHOD = """\
- **Interleaved rounds.** For each round, for each workload, every framework runs once, in an
  order that rotates from one workload and round to the next, so that a slow minute of the
  machine does not land on one framework.
- **One process per run.** The parent fills a fresh durable classic queue (transient 100-byte
  or 1 KB JSON messages, publisher confirms in a window of 5,000), checks its depth, and starts
  `bench/_child.py`, which imports only its framework, consumes exactly N messages, records its
  RSS and exits by itself (a watchdog kills it after a hard timeout). The parent then checks the
  queue is empty (a message not acked would have gone back to the queue when the child's
  connection closed) and deletes every queue the run created.
- **Timing** starts when the first handler starts and stops when the last ack has been sent, as
  the child sees it: pika and aio-pika ack in the handler; steadyrabbit's `worker.stats.acked`
  and FastStream's `IncomingMessage.processed` are polled every 0.5 ms once the last handler
  ended; dramatiq counts with an `after_ack` middleware hook. Start-up and shutdown are not
  timed.
- **Same prefetch and concurrency.** W1, W2, W4: prefetch 100 and 100 handlers at once; W3:
  prefetch 32 and 32 threads; W5: prefetch 10,000 (steadyrabbit: 100 handlers; aio-pika and
  FastStream start a task per delivery, so up to 10,000; pika is sequential; dramatiq 100
  threads). Every consumer acks every message after its handler returned (no auto-ack mode).
  pika, aio-pika, FastStream and dramatiq send one `basic.ack` per message; steadyrabbit may
  fold the acks completed in one event-loop turn into one `multiple=True` ack (its own design:
  a message is still acked only once its own handler has finished). With a prefetch equal to
  the concurrency (W2, W3), a handler slot freed by an ack gets its next message only after the
  broker has received that ack and sent a new delivery, so 100 % of ideal is out of reach by
  design; how close a framework gets measures its overhead per message.
- **steadyrabbit**: `App().add_consumer(handler, queue, concurrency=..., prefetch=...)` run by
  `async with Worker(app, Settings(...))` on uvloop (as `steadyrabbit.run` does), heartbeat left
  at its default. Async handlers for W1, W2, W4 (`decode="json"`) and W5; a sync `def` handler
  for W3, which steadyrabbit runs in its own pool of `concurrency` threads. Each run has its
  own fresh, empty `state_dir` (a temporary directory).
- **steadyrabbit with message ids (W1, W2).** Idempotency is on by default, and it acts only on
  messages with a `message_id`; the suite's messages have none, so the plain steadyrabbit rows
  pass through it. Two more steadyrabbit runs per round consume the same workload from a queue
  whose every message carries a unique `message_id` (a UUID set when filling): *ids,
  idempotency on* with the default settings (a lease in the SQLite store in `state_dir` before
  the handler, a done record after it; WAL, `synchronous=NORMAL`, written behind the
  messages in one transaction per 100 ms) and *ids, idempotency off* with
  `Settings(idempotency=False)`. The parent checks that the on run left one done record per
  message in its store.
- **raw pika**: `BlockingConnection`, `basic_qos(prefetch_count=...)`, `basic_consume` with a
  plain callback and `basic_ack` per message. **W2 is not applicable**: pika has no async
  handlers, and a callback that waits blocks the connection, so it handles one message at a
  time; its row shows that sequential rate (one `time.sleep(0.05)` per message, measured on
  100 messages only: about 20 msg/s by construction) for scale, and no ratios are given for W2.
  W3 uses pika's documented thread pattern: the callback hands the message to a pool of 32
  threads, which return the ack to the connection's thread with `add_callback_threadsafe`.
  *pika, batched acks* (W1 only): the same consumer acking every 50th delivery (half the
  prefetch) and the last one with `multiple=True`, the cheapest raw pika consumer there is: the
  reference for CPU per message. *at its defaults*: no `basic.qos`, the handler in the callback.
- **aio-pika**: `connect_robust`, `channel.set_qos(prefetch_count=...)`, `queue.consume`,
  `await message.ack()` in the callback; aio-pika runs each delivery's callback as a task. W3:
  `loop.run_in_executor` on a pool of 32 threads. Measured on the default asyncio loop and on
  uvloop (`aio-pika+uvloop`).
- **FastStream**: `RabbitBroker(url, logger=None)` (no per-message log lines) and one
  `@broker.subscriber(RabbitQueue(name, declare=False), channel=Channel(prefetch_count=...))`;
  the default ack policy acks after the handler returns. W4 messages carry
  `content_type: application/json`, so FastStream decodes them itself before the handler (the
  others call `json.loads` in the handler, steadyrabbit decodes with `decode="json"`). W3 is a
  sync `def` subscriber, which FastStream runs in a worker thread (anyio's pool, 40 threads);
  the prefetch of 32 bounds it to 32 at once. Runs on uvloop, as `faststream run` does.
- **dramatiq**: `RabbitmqBroker(url=...)`, one actor (`max_retries=0`, default middleware),
  `dramatiq.Worker(broker, worker_threads=concurrency)`, prefetch through its documented
  `dramatiq_queue_prefetch` variable. dramatiq only consumes its own message format, so its
  queue is declared with `broker.declare_queue` and filled with `dramatiq.Message(...).encode()`
  envelopes carrying the same payload (about 260 bytes for the 100-byte text, 1.2 KB for the
  JSON); it decodes that JSON envelope for every message, in every workload. W2 uses an
  `async def` actor with dramatiq's AsyncIO middleware (each of the 100 worker threads waits for
  its coroutine on dramatiq's event-loop thread)."""


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Benchmark steadyrabbit against raw pika, aio-pika, FastStream and dramatiq.",
    )
    parser.add_argument(
        "--workload",
        action="append",
        metavar="W",
        help="W1..W5; repeatable or comma-separated (default: all)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument(
        "--frameworks",
        default=",".join(FRAMEWORKS),
        help=f"comma-separated, from {','.join(FRAMEWORKS)} (default: all; {IDS_ON} and "
        f"{IDS_OFF}: steadyrabbit on messages with a message_id, idempotency on / off, "
        f"{' and '.join(ID_WORKLOADS)} only)",
    )
    parser.add_argument("--url", default=DEFAULT_URL, help="broker URL (env STEADYRABBIT_URL)")
    sizes = ", ".join(f"{name} {count:,}" for name, count in DEFAULT_MESSAGES.items())
    full = ", ".join(f"{name} {w.messages:,}" for name, w in WORKLOADS.items())
    parser.add_argument(
        "--full",
        action="store_true",
        help=f"the full sizes ({full}) and every round of W5 (about {FULL_RUN_MINUTES} min); "
        f"default: {sizes}, one round of W5 (about {DEFAULT_RUN_MINUTES} min)",
    )
    parser.add_argument(
        "--messages", type=int, help="messages per run, for every workload (overrides the sizes)"
    )
    parser.add_argument("--w5-messages", type=int, help="messages per W5 run")
    parser.add_argument(
        "--w5-rounds",
        type=int,
        help=f"rounds of W5 (default {DEFAULT_W5_ROUNDS}, or --rounds with --full)",
    )
    parser.add_argument(
        "--pika-sequential-messages",
        type=int,
        default=PIKA_SEQUENTIAL_MESSAGES,
        help="messages for raw pika's sequential W2 run (default %(default)s)",
    )
    parser.add_argument(
        "--child-timeout",
        type=float,
        help="hard timeout of one run in seconds (default 60 + messages / 250)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per run on stdout (the table goes to stderr)",
    )
    parser.add_argument("--write", action="store_true", help="(re)write BENCHMARKS.md")
    args = parser.parse_args(argv)
    names: list[str] = []
    for item in args.workload or list(WORKLOADS):
        for name in item.split(","):
            name = name.strip().upper()
            if name not in WORKLOADS:
                parser.error(f"unknown workload {name!r}; use one of {', '.join(WORKLOADS)}")
            if name not in names:
                names.append(name)
    args.workloads = names
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    for framework in frameworks:
        if framework not in FRAMEWORKS:
            parser.error(f"unknown framework {framework!r}; use some of {','.join(FRAMEWORKS)}")
    args.frameworks = list(dict.fromkeys(frameworks))
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    counts = {}
    for name, workload in WORKLOADS.items():
        counts[name] = args.messages or (workload.messages if args.full else DEFAULT_MESSAGES[name])
    if args.w5_rounds is None:
        args.w5_rounds = args.rounds if args.full else DEFAULT_W5_ROUNDS
    args.w5_rounds = min(max(args.w5_rounds, 1), args.rounds)
    if args.w5_messages:
        counts["W5"] = args.w5_messages
    if any(count < 1 for count in counts.values()):
        parser.error("message counts must be at least 1")
    args.messages_for = counts
    args.argv = list(argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _interrupt)  # clean up the queues on SIGTERM too
    started = dt.datetime.now(dt.UTC)
    load_before = f"{os.getloadavg()[0]:.2f}"
    clock = time.monotonic()
    runner = Runner(args)
    table_out = sys.stderr if args.json else sys.stdout
    workloads = [WORKLOADS[name] for name in args.workloads]
    frameworks = args.frameworks
    measurements: list[Measurement] = []
    total = sum(
        len(frameworks_for(w, frameworks)) * (args.w5_rounds if w.name == "W5" else args.rounds)
        for w in workloads
    )
    _log(
        f"steadyrabbit benchmarks: {', '.join(args.workloads)} x {', '.join(frameworks)}, "
        f"{args.rounds} round(s) = {total} runs"
    )
    for workload in workloads:
        if workload.sleep:
            CEILINGS[workload.name] = calibrate(workload)
            _log(
                f"{workload.name}: slots that only sleep, no broker: "
                f"{CEILINGS[workload.name]:,.0f} msg/s "
                f"({100 * CEILINGS[workload.name] / (workload.ideal or 1):.1f} % of ideal)"
            )
    try:
        for round_ in range(1, args.rounds + 1):
            for index, workload in enumerate(workloads):
                if workload.name == "W5" and round_ > args.w5_rounds:
                    continue
                these = frameworks_for(workload, frameworks)
                if not these:
                    continue
                shift = (round_ - 1 + index) % len(these)
                order = these[shift:] + these[:shift]
                for framework in order:
                    measurement = runner.measure(framework, workload, round_)
                    measurements.append(measurement)
                    _report(measurement, len(measurements), total, args.json)
    except KeyboardInterrupt:
        _log("interrupted: deleting the queues and summarizing what was measured")
    finally:
        if runner.created:
            runner.cleanup(sorted(runner.created))
    duration = time.monotonic() - clock
    rows = summarize(measurements, workloads, frameworks)
    print(file=table_out)
    print(results_table(rows), file=table_out)
    memory = memory_table(rows)
    if memory:
        print("\nW5 memory (MB):", file=table_out)
        print(memory, file=table_out)
    at_defaults = defaults_table(rows)
    if at_defaults:
        print("\nAt the defaults:", file=table_out)
        print(at_defaults, file=table_out)
    cost = idempotency_table(rows)
    if cost:
        print("\nIdempotency cost (messages with a message_id):", file=table_out)
        print(cost, file=table_out)
    print("\nTargets:", file=table_out)
    for line in targets(rows):
        print(line.replace("**", ""), file=table_out)
    print(f"\nDone in {duration / 60:.1f} min.", file=table_out)
    if args.write:
        run = {
            "versions": versions(args.url),
            "machine": machine(),
            "started": started,
            "duration_s": duration,
            "load": (load_before, f"{os.getloadavg()[0]:.2f}"),
            "source": source_state(),
        }
        write_benchmarks(args, rows, run)
        _log(f"wrote {BENCHMARKS_MD}")
    failed = [m for m in measurements if not m.ok]
    if failed:
        _log(f"{len(failed)} run(s) failed; their logs are in {runner.tmp}")
        return 1
    shutil.rmtree(runner.tmp, ignore_errors=True)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _report(measurement: Measurement, done: int, total: int, as_json: bool) -> None:
    if as_json:
        print(json.dumps(measurement.as_json()), flush=True)
    head = f"[{done}/{total}] {measurement.workload} r{measurement.round} {measurement.framework}"
    if measurement.ok:
        extra = measurement.extra
        _log(
            f"{head}: {_fmt_rate(measurement.msg_per_s)} msg/s, "
            f"peak RSS {measurement.peak_rss_mb:.1f} MB "
            f"(fill {extra.get('fill_s', 0):.1f} s, child {extra.get('wall_s', 0):.1f} s)"
        )
    else:
        _log(f"{head}: FAILED: {measurement.error}")


if __name__ == "__main__":
    sys.exit(main())
