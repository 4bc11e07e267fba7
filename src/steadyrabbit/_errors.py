"""Every exception steadyrabbit raises derives from :class:`SteadyRabbitError`.

The tree::

    SteadyRabbitError
    ├── ConfigurationError         a setting, URL or option is malformed; nothing was attempted
    ├── PermanentBrokerError       the broker refused something retrying cannot fix: stop
    │   ├── AuthenticationError    wrong user name or password
    │   ├── AccessRefusedError     no access to the virtual host or resource
    │   ├── CertificateError       TLS failed: a certificate was refused, by us or the broker
    │   ├── TopologyConflictError  a queue or exchange exists with other properties
    │   └── PublishRefusedError    the broker refused a published message (nack, 403, 406)
    ├── BrokerUnreachableError     no broker answered within the first-connection budget
    ├── StatusUnavailableError     a worker's metrics endpoint did not answer with its status
    ├── ConnectionLostError        transient: the connection broke; the supervisor reconnects
    ├── ChannelClosedError         the broker closed a channel (reply code and text attached)
    ├── UnroutableError            a publish could reach no queue: its exchange is missing,
    │   │                          or no binding matched (mandatory)
    │   └── MessageReturnedError   the broker returned it (basic.return); the channel stays open
    ├── PublishTimeoutError        a publish was not confirmed in time (a memory or disk alarm
    │                              blocks publishers; the broker is down); it may still arrive
    ├── PayloadError               a body cannot be encoded to bytes (publishing) or decoded
    │                              and validated (a typed handler parameter)
    ├── ClosedByUserError          you closed it; nothing is reconnected
    ├── HandlerExit                a handler raised SystemExit: a failure of its message
    ├── Reject                     control flow: a handler raises it to dead-letter the message
    └── Retry                      control flow: a handler raises it to retry after a delay

"It broke" (:class:`ConnectionLostError`, :class:`ChannelClosedError`) is kept apart from
"you closed it" (:class:`ClosedByUserError`): only the former is ever recovered.
"""

from __future__ import annotations


class SteadyRabbitError(Exception):
    """Root of every steadyrabbit exception."""


class ConfigurationError(SteadyRabbitError):
    """A setting, URL or CLI option is malformed."""


class PermanentBrokerError(SteadyRabbitError):
    """The broker refused a request in a way that reconnecting cannot fix."""


class AuthenticationError(PermanentBrokerError):
    """The broker rejected the credentials."""


class AccessRefusedError(PermanentBrokerError):
    """The user may not use this virtual host or resource."""


class CertificateError(PermanentBrokerError):
    """The TLS handshake failed: the broker's certificate did not verify (another CA, expired,
    issued for another host name), or the broker refused this client's certificate."""


class TopologyConflictError(PermanentBrokerError):
    """An exchange or queue already exists with properties that differ from the declaration."""


class PublishRefusedError(PermanentBrokerError):
    """The broker refused one published message: ``basic.nack`` (a full queue that rejects
    publishes), or a channel closed with 403 or 406 on the publish. Sending the same message
    again would be refused again. ``reply_code`` is that of the channel close (None for a
    nack, which names the message it refuses; a close fails every publish in flight on it)."""

    def __init__(self, message: str, *, reply_code: int | None = None) -> None:
        super().__init__(message)
        self.reply_code = reply_code


class BrokerUnreachableError(SteadyRabbitError):
    """No configured broker accepted a connection within the first-connection budget."""


class StatusUnavailableError(SteadyRabbitError):
    """``steadyrabbit top``: the URL did not answer, or not as a steadyrabbit worker's metrics
    endpoint (``/status.json``)."""


class ConnectionLostError(SteadyRabbitError):
    """The connection broke: reset, missed heartbeats, closed by the broker. Transient.

    ``cause`` is a short label for logs and metrics: ``connection_lost``, ``missed_heartbeats``,
    ``closed_by_broker``, ``connect_failed``.
    """

    def __init__(self, message: str, *, cause: str = "connection_lost") -> None:
        super().__init__(message)
        self.cause = cause


class ChannelClosedError(SteadyRabbitError):
    """The broker closed a channel; ``reply_code`` and ``reply_text`` say why."""

    def __init__(self, reply_code: int, reply_text: str) -> None:
        super().__init__(f"channel closed by the broker: {reply_code} {reply_text}")
        self.reply_code = reply_code
        self.reply_text = reply_text


class UnroutableError(SteadyRabbitError):
    """A published message could reach no queue: its exchange does not exist, or (a mandatory
    publish) no binding matched its routing key. Nothing was enqueued; sending it again the
    same way would fail the same way."""


class MessageReturnedError(UnroutableError):
    """A mandatory publish was returned (``basic.return``): no queue matched its routing key.
    The channel stays open."""

    def __init__(self, reply_code: int, reply_text: str) -> None:
        super().__init__(f"message returned by the broker: {reply_code} {reply_text}")
        self.reply_code = reply_code
        self.reply_text = reply_text


class PublishTimeoutError(SteadyRabbitError):
    """A publish was not confirmed within its timeout: the broker blocks publishers while a
    memory or disk alarm lasts, or no broker was reachable. The message may still have been
    enqueued (its confirm was not seen): send it again with the same ``message_id``, and an
    idempotent consumer runs it once."""


class PayloadError(SteadyRabbitError, TypeError):
    """A body could not be encoded for publishing (not bytes, text, JSON-serialisable data, a
    dataclass or a pydantic model), or a handler's typed parameter could not be decoded and
    validated from a message's body."""


def is_consumer_timeout(error: ChannelClosedError) -> bool:
    """The broker closed the channel because a delivery outlived its ``consumer_timeout``."""
    return error.reply_code == 406 and "timeout" in error.reply_text.lower()


class ClosedByUserError(SteadyRabbitError):
    """The connection or channel was closed on purpose by this process."""


class HandlerExit(SteadyRabbitError):
    """A handler raised SystemExit (``sys.exit()``) or, in a sync handler's thread, another
    exception that is not an :class:`Exception` (KeyboardInterrupt, GeneratorExit). Its message
    fails like on any other error (retried, then dead-lettered) and the worker goes on.
    ``exception`` is the original (also the ``__cause__``); a retry policy's ``permanent``
    types are matched against it.
    """

    def __init__(self, exception: BaseException) -> None:
        text = str(exception)
        name = type(exception).__name__
        super().__init__(f"{name}: {text}" if text else name)
        self.exception = exception


class Reject(SteadyRabbitError):
    """Raise from a handler to send the message to the dead-letter queue at once."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Retry(SteadyRabbitError):
    """Raise from a handler to retry the message later.

    ``delay`` (seconds) overrides the policy's next delay; the policy's ``max_attempts`` still
    applies, after which the message is dead-lettered with ``reason``.
    """

    def __init__(self, reason: str = "retry requested", *, delay: float | None = None) -> None:
        if delay is not None and not delay >= 0:
            raise ValueError("Retry delay must be >= 0 seconds")
        super().__init__(reason)
        self.reason = reason
        self.delay = delay
