"""steadyrabbit's test kit: run your consumers against a real RabbitMQ, under faults.

* :func:`run_handler` / :func:`run_handler_sync`: run a handler on one message without a
  broker and get its :class:`~steadyrabbit.Decision` (ack, retry into which queue, dead letter
  with which reason) and the messages it published (:class:`Published`), in milliseconds.
* :class:`FaultProxy`: a TCP proxy between a client and a broker that resets, stalls,
  black-holes, delays or cuts connections on demand (one, or all of them).
* :func:`start_node` / :class:`BrokerNode`: a private, throw-away RabbitMQ node with its own
  settings (``consumer_timeout``, plugins...), next to the machine's broker, without root;
  :func:`start_cluster` / :class:`Cluster`: several of them joined into one cluster.
* ``steadyrabbit.testing.pytest_plugin``: pytest fixtures for both (opt in with
  ``pytest_plugins = ["steadyrabbit.testing.pytest_plugin"]`` in your ``conftest.py``).

Importing this package imports no pytest (the plugin module alone does), and
``import steadyrabbit`` does not import it.
"""

from ._node import BrokerNode, Cluster, find_rabbitmq_bin, start_cluster, start_node
from ._proxy import Direction, FaultProxy, ProxiedConnection
from ._stub import HandlerResult, Published, run_handler, run_handler_sync

__all__ = [
    "BrokerNode",
    "Cluster",
    "Direction",
    "FaultProxy",
    "HandlerResult",
    "ProxiedConnection",
    "Published",
    "find_rabbitmq_bin",
    "run_handler",
    "run_handler_sync",
    "start_cluster",
    "start_node",
]
