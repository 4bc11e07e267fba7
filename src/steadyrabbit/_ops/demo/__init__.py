"""``steadyrabbit demo``: the README's main job, end to end, against a real broker.

It publishes a backlog of JSON "contracts" (the first incident's shape: a durable topic exchange,
a durable queue bound with a routing key), starts a local web service that is slow and fails
now and then, and relays the queue to it with :func:`relay_app` in this process, showing the
worker's live view. A third of the way through it resets the worker's connections (RST, the
incident's ``ConnectionResetError(104)``) through :class:`steadyrabbit.testing.FaultProxy`, so
no root or ``rabbitmqctl`` is needed. Then it waits until every message is settled, stops the
worker gracefully and accounts for every message from the service's record, the worker's
counters and the broker's queues: delivered, retried, dead-lettered, reconnects, duplicates,
lost.

The package reads in the order a run goes:

- :mod:`.run`: :func:`~.run.run_demo`, the run itself: the proxy, the worker, the cut, the live
  view with the demo's own lines under it, and the waiting until every message is settled;
- :mod:`.service`: the slow, flaky local web service, and what it was told to fail;
- :mod:`.broker`: the demo's own operations on the broker (reset, publish the backlog, read
  the dead letters back), on a connection the cut does not touch;
- :mod:`.result`: :class:`~.result.DemoResult` and its summary; plain data, no I/O.

Nothing here imports click: the progress bar and the exit status are the CLI's
(``steadyrabbit._cli.demo``), which gives :func:`~.run.run_demo` a plain progress callback.
Import from the module you need; this package imports none of them.

The demo owns its queue, the queue's retry and dead-letter queues and its exchange: it deletes
them before it starts (leftovers of an interrupted run cannot skew it) and, unless asked to keep
them, when it ends. Never point it at a queue that holds anything you want.
"""
