"""An App for `steadyrabbit run tests.window_app:app`, whose consumers set their own window (or
part of it), for the tests of run's --concurrency and --prefetch defaults (tests/test_cli.py).

Importing this module touches no broker.
"""

from __future__ import annotations

from steadyrabbit import App, Message

app = App()


@app.consumer("window-own-concurrency", concurrency=4)
def own_concurrency(message: Message) -> None: ...


@app.consumer("window-own-prefetch", prefetch=2)
def own_prefetch(message: Message) -> None: ...
