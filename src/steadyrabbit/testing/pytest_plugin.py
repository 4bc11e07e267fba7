"""pytest fixtures for steadyrabbit's test kit: private RabbitMQ nodes and a fault proxy.

Opt in from your top-level ``conftest.py`` (the plugin is not loaded on its own)::

    pytest_plugins = ["steadyrabbit.testing.pytest_plugin"]

Fixtures:

``rabbitmq_node`` (session)
    One private RabbitMQ node (:class:`~steadyrabbit.testing.BrokerNode`) for the session,
    started on first use (a few seconds) and stopped at the end; log in as guest/guest at
    ``rabbitmq_node.url``. Tests share it: give each test its own queue names. Its settings are
    :func:`~steadyrabbit.testing.start_node`'s keywords, from ``rabbitmq_node_options``.
``rabbitmq_node_options`` (session)
    Those settings. The default is a stock broker whose channel tick runs every second (so a
    ``consumer_timeout_ms`` fires on time, see ``start_node``). Override the fixture to change
    them, e.g. ``return {"consumer_timeout_ms": 5000, "channel_tick_interval_ms": 1000}``.
``rabbitmq_node_factory`` (session)
    ``rabbitmq_node_factory(**start_node_keywords)`` starts another node with other settings;
    each is stopped at the end of the session, or earlier with ``node.stop()``.
``fault_proxy`` (function, async)
    A started :class:`~steadyrabbit.testing.FaultProxy` in front of ``rabbitmq_node``: connect
    to ``fault_proxy.url``. It is an async fixture for anyio's pytest plugin (installed with
    steadyrabbit, through httpx): mark the test ``@pytest.mark.anyio``, on the asyncio backend.
    With another async plugin, use ``async with FaultProxy(rabbitmq_node.url)`` in the test.

The ini option ``rabbitmq_bin`` names the directory of ``rabbitmq-server`` and ``rabbitmqctl``
when it is neither Debian's ``/usr/lib/rabbitmq/bin`` nor found on ``PATH``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from ._node import BrokerNode, start_node
from ._proxy import FaultProxy

__all__ = ["fault_proxy", "rabbitmq_node", "rabbitmq_node_factory", "rabbitmq_node_options"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "rabbitmq_bin",
        "directory of rabbitmq-server and rabbitmqctl for steadyrabbit's private nodes "
        "(default: /usr/lib/rabbitmq/bin, else the rabbitmq-server on PATH)",
        default="",
    )


@pytest.fixture(scope="session")
def rabbitmq_node_factory(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[Callable[..., BrokerNode]]:
    """Start private RabbitMQ nodes: ``rabbitmq_node_factory(**start_node_keywords)``."""
    base_dir = tmp_path_factory.mktemp("rabbitmq")
    rabbitmq_bin = str(pytestconfig.getini("rabbitmq_bin")) or None
    started: list[BrokerNode] = []

    def start(**start_node_keywords: Any) -> BrokerNode:
        start_node_keywords.setdefault("rabbitmq_bin", rabbitmq_bin)
        node = start_node(base_dir, **start_node_keywords)
        started.append(node)
        return node

    try:
        yield start
    finally:
        for node in started:
            node.stop()


@pytest.fixture(scope="session")
def rabbitmq_node_options() -> dict[str, Any]:
    """The ``start_node`` keywords of ``rabbitmq_node``: override this fixture to change them."""
    return {"channel_tick_interval_ms": 1000}


@pytest.fixture(scope="session")
def rabbitmq_node(
    rabbitmq_node_factory: Callable[..., BrokerNode], rabbitmq_node_options: dict[str, Any]
) -> BrokerNode:
    """A private RabbitMQ node for the whole session (guest/guest at ``rabbitmq_node.url``)."""
    return rabbitmq_node_factory(**rabbitmq_node_options)


@pytest.fixture
async def fault_proxy(
    rabbitmq_node: BrokerNode, anyio_backend: object
) -> AsyncIterator[FaultProxy]:
    """A started FaultProxy in front of ``rabbitmq_node``; connect to ``fault_proxy.url``."""
    backend = anyio_backend[0] if isinstance(anyio_backend, tuple) else anyio_backend
    if backend != "asyncio":
        pytest.skip(f"the fault proxy runs on asyncio, not on {backend}")
    async with FaultProxy(rabbitmq_node.url) as proxy:
        yield proxy
