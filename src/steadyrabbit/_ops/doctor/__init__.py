"""``steadyrabbit doctor``: check a broker, its queues and a worker's settings before trouble.

:func:`~.gather.diagnose` connects with the settings a worker would use and returns a
:class:`~.report.DoctorReport`: what it saw (server, heartbeat, queues, consumers, alarms, how
long runs are protected, the idempotency store, the cluster's members and where each queue
lives) and a list of findings, each with a level (ok, info, warning, critical), a title, a
detail and a one-line fix.

The package reads in the order a diagnosis runs:

- :mod:`.report`: the report's dataclasses; plain data;
- :mod:`.management`: the management HTTP API client (where it is, GET, why it failed);
- :mod:`.gather`: the AMQP probe and the collection of facts, and ``diagnose()``;
- :mod:`.rules`: pure functions from a report to its findings, testable without a broker;
- :mod:`.render`: the checklist people read.

Import from the module you need; this package imports none of them. The rules and the
renderer import only :mod:`.report` (and the renderer the URL masking): no I/O.

The broker's ``consumer_timeout`` is not exposed over HTTP by RabbitMQ 3.10 (neither
``/api/overview`` nor ``/api/nodes`` carries it), so the configured ``--consumer-timeout`` is
used and the report says so.
"""
