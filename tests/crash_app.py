"""An app whose handler kills its own worker process, for the crash-loop tests.

CRASH_QUEUE names the queue, CRASH_QUEUE_TYPE its type, CRASH_CONCURRENCY the handler's
concurrency, CRASH_LOG a file that gets one line per attempt (written and flushed before the
process dies) and a "done" line per message handled. A body starting with "poison" kills the
process; one starting with "slow" takes 200 ms.
"""

from __future__ import annotations

import os
import time

from steadyrabbit import App, Message, RetryPolicy

app = App(
    retry=RetryPolicy(max_attempts=10, delays=(0.1,), max_deliveries=3),
    queue_type=os.environ.get("CRASH_QUEUE_TYPE", "classic"),
)


def _log(line: str) -> None:
    with open(os.environ["CRASH_LOG"], "a") as log:
        log.write(f"{line}\n")
        log.flush()
        os.fsync(log.fileno())


@app.consumer(
    os.environ.get("CRASH_QUEUE", "steadyrabbit-crash"),
    concurrency=int(os.environ.get("CRASH_CONCURRENCY", "1")),
)
def crash(message: Message) -> None:
    _log(f"{message.body.decode()} redelivered={message.redelivered}")
    if message.body.startswith(b"poison"):
        os._exit(70)  # what a segfault, an OOM kill or a C extension's abort look like
    if message.body.startswith(b"slow"):
        time.sleep(0.2)
    _log(f"done {message.body.decode()}")
