"""The app `bench/scale.py` runs under `steadyrabbit run --processes N`.

SCALE_QUEUE names the queue; SCALE_WORK is "noop" (W1: an async no-op) or "cpu" (a sync
handler that burns about SCALE_CPU_MS milliseconds of CPU per message, GIL held).
"""

from __future__ import annotations

import hashlib
import os
import time

from steadyrabbit import App, Message

QUEUE = os.environ.get("SCALE_QUEUE", "steadyrabbit-bench-scale")
WORK = os.environ.get("SCALE_WORK", "noop")
CPU_SECONDS = float(os.environ.get("SCALE_CPU_MS", "2")) / 1000

app = App()

if WORK == "cpu":

    @app.consumer(QUEUE, concurrency=4)
    def burn(message: Message) -> None:
        deadline = time.thread_time() + CPU_SECONDS
        digest = message.body
        while time.thread_time() < deadline:
            digest = hashlib.sha256(digest).digest()

else:

    @app.consumer(QUEUE, concurrency=100)
    async def noop(message: Message) -> None:
        pass
