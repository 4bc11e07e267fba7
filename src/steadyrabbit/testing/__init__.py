"""steadyrabbit's test kit: run your consumers against a real RabbitMQ, under faults.

* :func:`run_handler` / :func:`run_handler_sync`: run a handler on one message without a
  broker and get its :class:`~steadyrabbit.Decision` (ack, retry into which queue, dead letter
  with which reason), in milliseconds.
* :func:`start_node` / :class:`BrokerNode`: a private, throw-away RabbitMQ node with its own
  settings (``consumer_timeout``, plugins...), next to the machine's broker, without root.

Importing this package imports no pytest (the plugin module alone does), and
``import steadyrabbit`` does not import it.
"""

from ._node import BrokerNode, find_rabbitmq_bin, start_node
from ._stub import run_handler, run_handler_sync

__all__ = [
    "BrokerNode",
    "find_rabbitmq_bin",
    "run_handler",
    "run_handler_sync",
    "start_node",
]
