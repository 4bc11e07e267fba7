"""Broker URLs: parse and validate ``amqp://`` / ``amqps://`` URLs, and mask their passwords."""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

from ._errors import ConfigurationError

_DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}
_QUERY_KEYS = {"heartbeat", "connection_timeout"}


@dataclass(frozen=True)
class BrokerAddress:
    """One broker endpoint, parsed from a URL. ``str()`` and ``repr()`` never show the password."""

    scheme: str
    host: str
    port: int
    vhost: str
    username: str
    password: str = field(repr=False)
    heartbeat: int | None = None
    connection_timeout: float | None = None

    @property
    def tls(self) -> bool:
        return self.scheme == "amqps"

    @property
    def display(self) -> str:
        """The URL with the password masked: safe for logs, errors and metrics."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        vhost = "%2F" if self.vhost == "/" else self.vhost
        return f"{self.scheme}://{self.username}:****@{host}:{self.port}/{vhost}"

    def __str__(self) -> str:
        return self.display


def split_url(
    url: str, what: str, schemes: Collection[str], shown: str
) -> tuple[SplitResult, int | None]:
    """``urlsplit`` with the checks every URL here needs: a valid port, one of ``schemes``, a
    host. Each failure is one sentence naming ``what`` ("broker URL") and ``shown``, the URL as
    it may be shown (masked); urllib's own messages could quote the password."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ConfigurationError(
            f"malformed {what} {shown!r}: the port must be a number from 1 to 65535 "
            "(percent-encode '/', '#', '?' and '@' in the user name and password)"
        ) from None
    if parts.scheme not in schemes:
        *others, last = (f"{scheme}://" for scheme in schemes)
        choices = f"{', '.join(others)} or {last}" if others else last
        raise ConfigurationError(f"malformed {what} {shown!r}: the scheme must be {choices}")
    if not parts.hostname:
        raise ConfigurationError(f"malformed {what} {shown!r}: it names no host")
    if port == 0:
        raise ConfigurationError(f"malformed {what} {shown!r}: port 0 is not a valid port")
    return parts, port


def parse_url(url: str) -> BrokerAddress:
    """Parse an AMQP URL, raising :class:`ConfigurationError` with one readable sentence."""
    shown = mask_url(url)
    parts, port = split_url(url, "broker URL", _DEFAULT_PORTS, shown)
    assert parts.hostname is not None  # checked by split_url
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    vhost = unquote(path) if path else "/"
    heartbeat: int | None = None
    connection_timeout: float | None = None
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in _QUERY_KEYS:
            known = ", ".join(sorted(_QUERY_KEYS))
            raise ConfigurationError(
                f"malformed broker URL {shown!r}: unknown query parameter {key!r} "
                f"(known: {known})"
            )
        try:
            number = float(value)
        except ValueError:
            raise ConfigurationError(
                f"malformed broker URL {shown!r}: {key} must be a number, not {value!r}"
            ) from None
        if number < 0:
            raise ConfigurationError(f"malformed broker URL {shown!r}: {key} must be >= 0")
        if key == "heartbeat":
            heartbeat = int(number)
        else:
            connection_timeout = number
    return BrokerAddress(
        scheme=parts.scheme,
        host=parts.hostname,
        port=port or _DEFAULT_PORTS[parts.scheme],
        vhost=vhost,
        username=unquote(parts.username) if parts.username is not None else "guest",
        password=unquote(parts.password) if parts.password is not None else "guest",
        heartbeat=heartbeat,
        connection_timeout=connection_timeout,
    )


# The password part runs to the last "@" of the URL, so a raw "@", "/", "#" or "?" in it is
# masked too (at worst this masks more than the password, never less).
_USERINFO = re.compile(r"(?P<prefix>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*):[^\s]*@")


def mask_url(text: str) -> str:
    """Replace the password of every URL in ``text`` with ``****``."""
    return _USERINFO.sub(r"\g<prefix>:****@", text)
