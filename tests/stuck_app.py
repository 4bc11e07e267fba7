"""An app with a sync handler that never returns, for `steadyrabbit run tests.stuck_app:app`.

Configured by the environment, read at import time:

* ``STUCK_QUEUE``: the queue whose handler gets stuck forever on every message: in
  ``time.sleep`` (body ``sleep``) or in a busy loop that never sleeps (body ``spin``);
* ``STUCK_OUT``: a file that gets ``stuck BODY`` when that handler starts on a message;
* the queue ``STUCK_QUEUE + "-other"`` has a handler that asks for a retry in 5 s: with a
  conflicting ``<that queue>.retry.5000ms`` on the broker, that stops the worker with a
  permanent error while the stuck handler still runs.
"""

from __future__ import annotations

import os
import time

from steadyrabbit import App, Message, Retry

QUEUE = os.environ.get("STUCK_QUEUE", "steadyrabbit-stuck")
OUT = os.environ.get("STUCK_OUT")
RETRY_DELAY = 5  # seconds: the retry queue is <QUEUE>-other.retry.5000ms

app = App()


@app.consumer(QUEUE)
def stuck(message: Message) -> None:
    if OUT is None:
        raise RuntimeError("STUCK_OUT is not set")
    with open(OUT, "a", encoding="utf-8") as out:
        out.write(f"stuck {message.body.decode()}\n")
    if message.body == b"spin":
        while True:  # holds the GIL whenever it runs; never sleeps
            pass
    while True:
        time.sleep(3600)


@app.consumer(f"{QUEUE}-other")
def other(message: Message) -> None:
    raise Retry("later", delay=RETRY_DELAY)
