"""An app with one long job, for the hand-off tests: its worker is SIGKILLed mid-job.

LONG_QUEUE names the queue, LONG_LOG a file that gets a "start <body>" line when a run begins
and a "done <body>" line when it completes (each flushed to disk at once), LONG_SECONDS how
long a run takes.
"""

from __future__ import annotations

import asyncio
import os

from steadyrabbit import App, Message

app = App()


def _log(line: str) -> None:
    with open(os.environ["LONG_LOG"], "a") as log:
        log.write(f"{line}\n")
        log.flush()
        os.fsync(log.fileno())


@app.consumer(os.environ.get("LONG_QUEUE", "steadyrabbit-long"))
async def long_job(message: Message) -> None:
    _log(f"start {message.body.decode()} pid={os.getpid()}")
    await asyncio.sleep(float(os.environ.get("LONG_SECONDS", "8")))
    _log(f"done {message.body.decode()} pid={os.getpid()}")
