"""An app whose handler kills its own worker process, for the crash-loop tests.

CRASH_QUEUE names the queue, CRASH_QUEUE_TYPE its type, CRASH_LOG a file that gets one line per
attempt (written and flushed before the process dies).
"""

from __future__ import annotations

import os

from steadyrabbit import App, Message, RetryPolicy

app = App(
    retry=RetryPolicy(max_attempts=10, delays=(0.1,), max_deliveries=3),
    queue_type=os.environ.get("CRASH_QUEUE_TYPE", "classic"),
)


@app.consumer(os.environ.get("CRASH_QUEUE", "steadyrabbit-crash"))
def crash(message: Message) -> None:
    with open(os.environ["CRASH_LOG"], "a") as log:
        log.write(f"{message.body.decode()} redelivered={message.redelivered}\n")
        log.flush()
        os.fsync(log.fileno())
    if message.body.startswith(b"poison"):
        os._exit(70)  # what a segfault, an OOM kill or a C extension's abort look like
