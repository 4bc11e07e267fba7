"""URLs: parse and validate broker URLs (``amqp://`` / ``amqps://``); mask the secrets of any URL
before it is shown."""

from __future__ import annotations

import logging
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, parse_qsl, unquote, unquote_plus, urlsplit

from ._errors import ConfigurationError

_DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}
_NUMBER_KEYS = {"heartbeat", "connection_timeout"}
# TLS, as RabbitMQ's URI spec names them (key_password is ours: the key file's passphrase).
_TLS_KEYS = {
    "cacertfile",
    "certfile",
    "keyfile",
    "key_password",
    "verify",
    "server_name_indication",
    "auth_mechanism",
}
_QUERY_KEYS = _NUMBER_KEYS | _TLS_KEYS


@dataclass(frozen=True)
class TlsOptions:
    """How an ``amqps://`` connection checks the broker and proves who it is (see
    :func:`parse_url`). ``repr()`` never shows the key's passphrase."""

    cacertfile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    key_password: str | None = field(default=None, repr=False)
    verify: bool = True
    server_name: str | None = None
    external_auth: bool = False


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
    tls_options: TlsOptions = field(default_factory=TlsOptions)

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
    tls: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in _QUERY_KEYS:
            known = ", ".join(sorted(_QUERY_KEYS))
            raise ConfigurationError(
                f"malformed broker URL {shown!r}: unknown query parameter {key!r} "
                f"(known: {known})"
            )
        if key in _TLS_KEYS:
            if parts.scheme != "amqps":
                raise ConfigurationError(
                    f"malformed broker URL {shown!r}: {key} is a TLS option, and TLS needs "
                    f"an amqps:// URL"
                )
            tls[key] = value
            continue
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
        tls_options=_tls_options(tls, shown),
        scheme=parts.scheme,
        host=parts.hostname,
        port=port or _DEFAULT_PORTS[parts.scheme],
        vhost=vhost,
        username=unquote(parts.username) if parts.username is not None else "guest",
        password=unquote(parts.password) if parts.password is not None else "guest",
        heartbeat=heartbeat,
        connection_timeout=connection_timeout,
    )


def _tls_options(given: dict[str, str], shown: str) -> TlsOptions:
    verify = given.get("verify", "verify_peer")
    if verify not in ("verify_peer", "verify_none"):
        raise ConfigurationError(
            f"malformed broker URL {shown!r}: verify must be verify_peer or verify_none"
        )
    mechanism = given.get("auth_mechanism", "plain").lower()
    if mechanism not in ("plain", "external"):
        raise ConfigurationError(
            f"malformed broker URL {shown!r}: auth_mechanism must be plain or external"
        )
    certfile, keyfile = given.get("certfile"), given.get("keyfile")
    if mechanism == "external" and certfile is None:
        raise ConfigurationError(
            f"malformed broker URL {shown!r}: auth_mechanism=external logs in with a client "
            f"certificate: give certfile (and keyfile)"
        )
    if keyfile is not None and certfile is None:
        raise ConfigurationError(f"malformed broker URL {shown!r}: keyfile needs certfile")
    return TlsOptions(
        cacertfile=given.get("cacertfile"),
        certfile=certfile,
        keyfile=keyfile,
        key_password=given.get("key_password"),
        verify=verify == "verify_peer",
        server_name=given.get("server_name_indication"),
        external_auth=mechanism == "external",
    )


# A URL in free text starts at its scheme and ends at the first white space; a quoted one (as
# repr() and JSON show it) ends at its closing quote, which stays in place.
_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")
_UNQUOTED_REST = re.compile(r"\S*")
_QUOTED_REST = {quote: re.compile(rf"(?:\\.|[^\\\n{quote}])*") for quote in ("'", '"')}
# The password runs to the last "@" of the URL, so a raw "@", "/", "#" or "?" in it is masked
# too (at worst this masks more than the password, never less).
_PASSWORD = re.compile(r"[^:/\s]*:(?P<secret>.*)@")
# User info without a password is a token more often than a name (https://TOKEN@host/).
_USER_ONLY = re.compile(r"(?P<secret>[^:/\s?#]+)@")
_QUERY_OR_FRAGMENT = re.compile(r"[?#]")
_MASK = "****"


def mask_url(text: str) -> str:
    """Mask the credential-bearing parts of every URL in ``text`` with ``****``: the password
    (or the whole user info when it has no password), and every query and fragment value.

    Parameter names stay visible (``?token=****&user=****``); an item without ``=`` is masked
    whole. Scheme, host, port and path stay as they are.
    """
    parts: list[str] = []
    done = 0
    while (start := _SCHEME.search(text, done)) is not None:
        before = text[start.start() - 1] if start.start() > 0 else ""
        rest = _QUOTED_REST.get(before, _UNQUOTED_REST).match(text, start.end())
        assert rest is not None  # both patterns match the empty string
        parts += [text[done : start.start()], _mask_one(text[start.start() : rest.end()])]
        done = rest.end()
    parts.append(text[done:])
    return "".join(parts)


def _mask_one(url: str) -> str:
    """``url`` starts with its scheme. Every part that may hold a secret is marked hidden, and
    each run of hidden characters becomes one ``****``. Where the rules disagree on where a
    part ends (a raw "@", ":" or "?" can be read more than one way), the union is hidden."""
    authority = url.index("://") + 3
    hidden = [False] * len(url)

    def hide(begin: int, end: int) -> None:
        hidden[begin:end] = [True] * (end - begin)

    for userinfo in (_PASSWORD.match(url, authority), _USER_ONLY.match(url, authority)):
        if userinfo is not None:
            hide(*userinfo.span("secret"))
    query = _QUERY_OR_FRAGMENT.search(url, authority)
    if query is not None:
        position = query.end()
        for item in url[position:].split("&"):
            name, equals, _ = item.partition("=")
            hide(position + (len(name) + 1 if equals else 0), position + len(item))
            position += len(item) + 1
    shown: list[str] = []
    for index, char in enumerate(url):
        if not hidden[index]:
            shown.append(char)
        elif index == 0 or not hidden[index - 1]:
            shown.append(_MASK)
    return "".join(shown)


# Shorter values would garble unrelated text when replaced (a "1" in "[Errno 111]") and hardly
# guard anything.
_MIN_SECRET_CHARS = 4


def url_secrets(url: str) -> tuple[str, ...]:
    """What :func:`mask_url` hides in ``url``, raw and percent-decoded: for scrubbing text
    that may quote it apart from the URL (an exception message, a response body)."""
    url = url.strip()
    try:
        parts = urlsplit(url)
    except ValueError:
        return (url,)
    values: list[str] = []
    if parts.password is not None:
        values.append(parts.password)
    elif parts.username is not None:
        values.append(parts.username)
    # Both readings: urlsplit's (a query, then a fragment) and mask_url's (one run of items
    # from the first "?" or "#"), so that whatever either hides is scrubbed.
    items = _QUERY_OR_FRAGMENT.search(url, url.find("://") + 3 if "://" in url else 0)
    tail = "" if items is None else url[items.end() :]
    for section in (parts.query, parts.fragment, tail):
        for item in section.split("&"):
            name, equals, value = item.partition("=")
            values.append(value if equals else name)
    forms = {form for value in values for form in (value, unquote(value), unquote_plus(value))}
    return tuple(form for form in forms if len(form) >= _MIN_SECRET_CHARS)


def scrub(text: str, secrets: Collection[str]) -> str:
    """``text`` with each of ``secrets`` and every URL's secrets masked."""
    # Longest first, so that a secret containing another is replaced whole.
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, _MASK)
    return mask_url(text)


class MaskingFilter(logging.Filter):
    """A logging filter that masks every URL's secrets in a record's message (see
    :func:`mask_url`); formatters mask tracebacks themselves (:class:`MaskingFormatter`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_url(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


class MaskingFormatter(logging.Formatter):
    """A formatter whose tracebacks have their URLs masked: an exception's text often quotes
    the URL it failed on, password or token included."""

    def formatException(self, ei: Any) -> str:
        return mask_url(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return mask_url(super().formatStack(stack_info))
