"""Where and how often to alert: validated settings, with no sending code (no SMTP, no HTTP).

Kept apart from the alerter so that ``import steadyrabbit`` and :class:`Settings` load none of
the sending machinery.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from ._errors import ConfigurationError
from ._url import mask_url, split_url

_SMTP_PORTS = {"smtp": 25, "smtps": 465, "smtp+starttls": 587}


@dataclass(frozen=True)
class SmtpServer:
    """An SMTP server parsed from ``AlertSettings.smtp_url``; ``str()`` shows no credentials."""

    scheme: str
    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @property
    def display(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def __str__(self) -> str:
        return self.display


def parse_smtp_url(url: str) -> SmtpServer:
    """Parse ``smtp://``, ``smtps://`` (implicit TLS) or ``smtp+starttls://`` URLs."""
    shown = mask_url(url)
    parts, port = split_url(url, "alert SMTP URL", _SMTP_PORTS, shown)
    assert parts.hostname is not None  # checked by split_url
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigurationError(
            f"malformed alert SMTP URL {shown!r}: it takes no path, query or fragment"
        )
    if parts.password is not None and not parts.username:
        raise ConfigurationError(
            f"malformed alert SMTP URL {shown!r}: a password needs a user name"
        )
    return SmtpServer(
        scheme=parts.scheme,
        host=parts.hostname,
        port=port or _SMTP_PORTS[parts.scheme],
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def webhook_display(url: str) -> str:
    """Scheme, host and port of a webhook URL only: its user info, path and query often hold
    the secret (Slack and Teams put it in the path)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return "(unparseable URL)"
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")


def _check_webhook_url(url: str) -> None:
    split_url(url, "alert webhook URL", ("http", "https"), webhook_display(url))


def _is_address(text: str) -> bool:
    # A line break would let an address inject headers; anything subtler is the server's call.
    return "@" in text and not any(c.isspace() for c in text)


@dataclass(frozen=True)
class AlertSettings:
    """Where and how often to alert. Validated on creation; see the module docstring.

    ``smtp_url``: ``smtp://[user:password@]host[:port]`` (port 25), ``smtps://`` (implicit TLS,
    port 465) or ``smtp+starttls://`` (port 587); e-mail needs ``email_from`` and ``email_to``.
    ``webhook_url``: an http(s) URL that receives a JSON POST; credentials in its user info
    (basic auth), path or query are never logged.
    ``group_wait``: seconds between the first event of a new group and the notification, so
    that a burst (and every other group starting meanwhile) arrives in one notification.
    ``repeat_interval``: seconds a notified group stays muted; its events meanwhile are counted
    and sent in one follow-up when the mute ends.
    ``reconnect_threshold`` reconnects of one connection within ``reconnect_window`` seconds
    raise an alert. ``stuck_after``: seconds after which a running handler is reported stuck;
    None means half of ``Settings.consumer_timeout`` (past it the broker closes the channel).
    ``body_chars``: how much of the first message body a notification shows.
    """

    smtp_url: str | None = None
    email_from: str | None = None
    email_to: tuple[str, ...] = ()
    webhook_url: str | None = None
    group_wait: float = 30.0
    repeat_interval: float = 900.0
    reconnect_threshold: int = 3
    reconnect_window: float = 300.0
    stuck_after: float | None = None
    body_chars: int = 200
    smtp: SmtpServer | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        to = (self.email_to,) if isinstance(self.email_to, str) else tuple(self.email_to)
        object.__setattr__(self, "email_to", to)
        smtp = None if self.smtp_url is None else parse_smtp_url(self.smtp_url)
        object.__setattr__(self, "smtp", smtp)
        if self.webhook_url is not None:
            _check_webhook_url(self.webhook_url)
        e_mail = (self.smtp_url, self.email_from, self.email_to)
        if any(e_mail) and not all(e_mail):
            raise ConfigurationError(
                "alert e-mail needs all of smtp_url, email_from and email_to"
            )
        if self.email_from is not None and not _is_address(self.email_from):
            raise ConfigurationError(
                f"alert email_from {self.email_from!r} is not an e-mail address"
            )
        for address in self.email_to:
            if not _is_address(address):
                raise ConfigurationError(f"alert email_to {address!r} is not an e-mail address")
        if self.smtp is None and self.webhook_url is None:
            raise ConfigurationError(
                "alerts need a destination: smtp_url with email_from and email_to, "
                "and/or webhook_url"
            )
        _require(self.group_wait >= 0, "alert group_wait must be >= 0 seconds")
        _require(self.repeat_interval > 0, "alert repeat_interval must be > 0 seconds")
        _require(self.reconnect_threshold >= 1, "alert reconnect_threshold must be >= 1")
        _require(self.reconnect_window > 0, "alert reconnect_window must be > 0 seconds")
        _require(
            self.stuck_after is None or self.stuck_after > 0,
            "alert stuck_after must be > 0 seconds",
        )
        _require(self.body_chars >= 10, "alert body_chars must be >= 10")

    def __repr__(self) -> str:
        # Settings objects end up in logs and tracebacks: no credentials, no webhook secret.
        smtp_url = None if self.smtp_url is None else mask_url(self.smtp_url)
        webhook = None if self.webhook_url is None else webhook_display(self.webhook_url)
        return (
            f"AlertSettings(smtp_url={smtp_url!r}, email_from={self.email_from!r}, "
            f"email_to={self.email_to!r}, webhook_url={webhook!r}, "
            f"group_wait={self.group_wait!r}, repeat_interval={self.repeat_interval!r}, "
            f"reconnect_threshold={self.reconnect_threshold!r}, "
            f"reconnect_window={self.reconnect_window!r}, stuck_after={self.stuck_after!r}, "
            f"body_chars={self.body_chars!r})"
        )


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigurationError(message)
