"""An App with a slow handler, for `steadyrabbit run tests.slow_app:app --processes N`.

Configured by the environment, read at import time:

* ``SLOW_QUEUE``: the queue to consume (default ``steadyrabbit-slow``);
* ``SLOW_OUT``: a file that gets ``start BODY PID`` when the handler starts on a message and
  ``done BODY PID`` when it finished, one line each (appended with one write, so the lines of
  several worker processes do not mix);
* ``SLOW_SECONDS``: how long the handler sleeps between the two (default 1).
"""

from __future__ import annotations

import os
import time

from steadyrabbit import App, Message

QUEUE = os.environ.get("SLOW_QUEUE", "steadyrabbit-slow")
OUT = os.environ.get("SLOW_OUT")
SECONDS = float(os.environ.get("SLOW_SECONDS", "1"))

app = App()


def _write(line: str) -> None:
    if OUT is None:
        raise RuntimeError("SLOW_OUT is not set")
    fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@app.consumer(QUEUE)
def work(message: Message) -> None:
    body = message.body.decode()
    _write(f"start {body} {os.getpid()}")
    time.sleep(SECONDS)
    _write(f"done {body} {os.getpid()}")
