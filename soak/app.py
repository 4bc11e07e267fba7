"""The soak's worker app, run as ``steadyrabbit run soak.app:app`` in its own process (so the
soak can SIGKILL and SIGTERM it). Configured by the environment:

* ``SOAK_QUEUE``: the queue to consume;
* ``SOAK_COMPLETIONS``: a file that gets each message id on a line when its handler completes
  (one ``O_APPEND`` write per line, so lines never mix).

The body says what the handler does: ``ok:N`` runs 10-50 ms, ``slow:N`` 5 s (longer than two
heartbeat intervals of the soak's 2 s), ``flaky:N`` fails its first attempt, ``poison:N``
always fails (dead-lettered after the retries).
"""

from __future__ import annotations

import asyncio
import os
import random

from steadyrabbit import App, Message, RetryPolicy

QUEUE = os.environ.get("SOAK_QUEUE", "steadyrabbit-soak")
COMPLETIONS = os.environ.get("SOAK_COMPLETIONS", "completions.txt")

app = App(retry=RetryPolicy(max_attempts=3, delays=(0.5,)))


@app.consumer(QUEUE, concurrency=16)
async def handle(message: Message) -> None:
    kind = message.body.partition(b":")[0]
    if kind == b"poison":
        raise ValueError("a poison message")
    if kind == b"flaky" and message.attempt == 1:
        raise ConnectionError("a transient failure")
    await asyncio.sleep(5.0 if kind == b"slow" else random.uniform(0.01, 0.05))
    line = f"{message.message_id}\n".encode()
    fd = os.open(COMPLETIONS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
