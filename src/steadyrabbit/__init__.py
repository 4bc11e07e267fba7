"""steadyrabbit: RabbitMQ consumers with slow handlers, made safe.

The event loop owns the AMQP connection, so heartbeats flow however long a handler runs; sync
handlers run in threads, async ones as tasks. Prefetch is never unlimited, a failed message goes
to ``<queue>.dlq`` (never into a requeue loop), the connection is recovered with backoff across
several brokers, and shutdown finishes the work in flight. Failures are retried later through
per-delay retry queues (no broker plugin) and end in ``<queue>.dlq``, and so do crash loops.
"""

from typing import TYPE_CHECKING, Any

from ._alert_settings import AlertSettings
from ._app import App, HandlerSpec
from ._decision import Decision, Outcome, decide
from ._errors import (
    AccessRefusedError,
    AuthenticationError,
    BrokerUnreachableError,
    CertificateError,
    ChannelClosedError,
    ClosedByUserError,
    ConfigurationError,
    ConnectionLostError,
    HandlerExit,
    MessageReturnedError,
    PayloadError,
    PermanentBrokerError,
    PublishRefusedError,
    PublishTimeoutError,
    Reject,
    Retry,
    SteadyRabbitError,
    TopologyConflictError,
    UnroutableError,
)
from ._message import Message, Properties
from ._middleware import Middleware, Publish
from ._ops.dlq import (
    DeadLetter,
    DeadLetterReport,
    ReplayResult,
    list_dead_letters,
    purge_dead_letters,
    replay_dead_letters,
)
from ._publishing import BlockingPublisher, Publisher
from ._retry import RetryPolicy
from ._settings import Settings
from ._stats import Stats
from ._url import BrokerAddress, mask_url, parse_url
from ._worker import Worker, run, serve

if TYPE_CHECKING:
    from ._inbox import PostgresInbox
    from ._ops.relay import relay_app


def __getattr__(name: str) -> Any:
    # The relay needs httpx, which loads its own command line (click, rich): only on demand.
    if name == "relay_app":
        from ._ops.relay import relay_app

        relay_app.__module__ = __name__
        return relay_app
    if name == "PostgresInbox":  # its module names psycopg's types; the driver loads on use
        from ._inbox import PostgresInbox

        PostgresInbox.__module__ = __name__
        return PostgresInbox
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AccessRefusedError",
    "AlertSettings",
    "App",
    "AuthenticationError",
    "BlockingPublisher",
    "BrokerAddress",
    "BrokerUnreachableError",
    "CertificateError",
    "ChannelClosedError",
    "ClosedByUserError",
    "ConfigurationError",
    "ConnectionLostError",
    "DeadLetter",
    "DeadLetterReport",
    "Decision",
    "HandlerExit",
    "HandlerSpec",
    "Message",
    "MessageReturnedError",
    "Middleware",
    "Outcome",
    "PayloadError",
    "PermanentBrokerError",
    "PostgresInbox",
    "Properties",
    "Publish",
    "PublishRefusedError",
    "PublishTimeoutError",
    "Publisher",
    "Reject",
    "ReplayResult",
    "Retry",
    "RetryPolicy",
    "Settings",
    "Stats",
    "SteadyRabbitError",
    "TopologyConflictError",
    "UnroutableError",
    "Worker",
    "decide",
    "list_dead_letters",
    "mask_url",
    "parse_url",
    "purge_dead_letters",
    "relay_app",
    "replay_dead_letters",
    "run",
    "serve",
]

# Public names say they are steadyrabbit's (tracebacks, documentation), not a private module's.
for _name in __all__:
    _value = globals().get(_name)
    if isinstance(_value, type) or callable(_value):
        _value.__module__ = __name__
del _name, _value
