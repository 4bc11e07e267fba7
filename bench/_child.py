"""One measurement, in its own process: ``python bench/_child.py SPEC_JSON``.

The parent (``bench/run.py``) has filled the queue. This process consumes exactly
``spec["messages"]`` messages with one framework, writes one JSON result to
``spec["result_file"]`` and exits by itself. A watchdog ends it with status 3 after
``spec["timeout"]`` seconds, whatever the framework is doing.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import threading
import time
import traceback
from typing import Any

from _probe import Probe

# framework name -> module in bench/consumers
MODULES = {
    "steadyrabbit": "steadyrabbit_consumer",
    # The same consumer on messages that carry a message_id, idempotency on / off (spec).
    "steadyrabbit+ids+on": "steadyrabbit_consumer",
    "steadyrabbit+ids+off": "steadyrabbit_consumer",
    # Each library at its own defaults (spec["defaults"]): no concurrency or prefetch given.
    "steadyrabbit+defaults": "steadyrabbit_consumer",
    "pika+defaults": "pika_consumer",
    "pika+batched-acks": "pika_consumer",
    "pika": "pika_consumer",
    "aio-pika": "aiopika_consumer",
    "aio-pika+uvloop": "aiopika_consumer",
    "faststream": "faststream_consumer",
    "dramatiq": "dramatiq_consumer",
}


def _watchdog(seconds: float) -> None:
    def expire() -> None:
        sys.stderr.write(f"benchmark child: hard timeout after {seconds:g} s\n")
        sys.stderr.flush()
        os._exit(3)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


def main() -> int:
    spec: dict[str, Any] = json.loads(sys.argv[1])
    _watchdog(float(spec["timeout"]))
    # Quiet: no framework logs anything below ERROR (and nothing is configured to print it
    # except the last-resort handler, which the parent captures from stderr).
    logging.disable(logging.WARNING)
    probe = Probe(int(spec["messages"]), tuple(spec.get("rss_marks", ())))
    started = time.perf_counter()
    module = importlib.import_module(f"consumers.{MODULES[spec['framework']]}")
    extra = module.run(spec, probe) or {}
    result = {**probe.result(), **extra}
    result["wall_s"] = time.perf_counter() - started
    with open(spec["result_file"], "w", encoding="utf-8") as out:
        json.dump(result, out)
    return 0


if __name__ == "__main__":
    status = 1
    try:
        status = main()
    finally:
        if sys.exc_info()[0] is not None:
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        # Leftover non-daemon threads of a framework must not keep the process alive.
        os._exit(status)
