"""A tiny App for `steadyrabbit run tests.sample_app:app` (used by tests/test_cli.py).

Configured by the environment, read at import time:

* ``SAMPLE_QUEUE``: the queue to consume (default ``steadyrabbit-sample``);
* ``SAMPLE_OUT``: a file that gets each message body appended as one line (UTF-8).

Importing this module touches no broker and no file, so the CLI tests can also load it for
its error cases (``tests.sample_app:nosuch``).
"""

from __future__ import annotations

import os

from steadyrabbit import App, Message

QUEUE = os.environ.get("SAMPLE_QUEUE", "steadyrabbit-sample")
OUT = os.environ.get("SAMPLE_OUT")

app = App()


@app.consumer(QUEUE)
def record(message: Message) -> None:
    """Append the body as one line to SAMPLE_OUT (a sync handler: it runs in a thread)."""
    if OUT is None:
        raise RuntimeError("SAMPLE_OUT is not set")
    line = message.body.decode("utf-8").replace("\n", " ")
    with open(OUT, "a", encoding="utf-8") as out:
        out.write(line + "\n")


def make_app(queue: str) -> App:
    """A factory that needs an argument, so `run tests.sample_app:make_app` cannot call it."""
    other = App()
    other.consumer(queue)(record)
    return other
