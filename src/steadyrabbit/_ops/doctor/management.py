"""The RabbitMQ management HTTP API, as doctor reads it: where it is, and a GET that says why
it failed.

Only ``GET /api/...``: doctor changes nothing on the broker. An API that cannot be used at all
raises :class:`ManagementUnavailable` (doctor then goes on with AMQP alone); an endpoint this
user may not read raises :class:`ManagementDenied` (doctor lists it as not checked).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from ..._errors import ConfigurationError
from ..._url import BrokerAddress, mask_url

__all__ = [
    "DEFAULT_MANAGEMENT_PORTS",
    "ManagementClient",
    "ManagementDenied",
    "ManagementTarget",
    "ManagementUnavailable",
    "management_target",
]

DEFAULT_MANAGEMENT_PORTS = {"amqp": ("http", 15672), "amqps": ("https", 15671)}


class ManagementUnavailable(Exception):
    """The management API cannot be used at all (unreachable, refused, not the API)."""


class ManagementDenied(Exception):
    """This user may not read this endpoint (needs another tag)."""


@dataclass(frozen=True)
class ManagementTarget:
    """Where the management API is, and as whom; ``display`` is masked."""

    base_url: str
    username: str
    password: str = field(repr=False)

    @property
    def display(self) -> str:
        scheme, _, rest = self.base_url.partition("://")
        return f"{scheme}://{quote(self.username, safe='')}:****@{rest}"


def management_target(address: BrokerAddress, url: str | None) -> ManagementTarget:
    """The management API for ``address``: ``url`` if given, else its host on port 15672
    (15671 for amqps), with the broker URL's credentials unless ``url`` carries its own."""
    if url is None:
        scheme, port = DEFAULT_MANAGEMENT_PORTS[address.scheme]
        host = f"[{address.host}]" if ":" in address.host else address.host
        return ManagementTarget(f"{scheme}://{host}:{port}", address.username, address.password)
    shown = mask_url(url)
    try:
        parsed = httpx.URL(url.strip())
        host = parsed.host
    except (httpx.InvalidURL, ValueError):
        raise ConfigurationError(f"malformed --management-url {shown!r}") from None
    if parsed.scheme not in ("http", "https") or not host:
        raise ConfigurationError(
            f"malformed --management-url {shown!r}: it must be http:// or https:// and name a host"
        )
    username = parsed.username or address.username
    password = parsed.password or (address.password if not parsed.username else "")
    netloc = f"[{host}]" if ":" in host else host
    if parsed.port is not None:
        netloc += f":{parsed.port}"
    path = parsed.path.rstrip("/")
    return ManagementTarget(f"{parsed.scheme}://{netloc}{path}", username, password)


class ManagementClient:
    """GET requests to the management API of ``target`` through ``client``."""

    def __init__(self, client: httpx.AsyncClient, target: ManagementTarget) -> None:
        self._client = client
        self._target = target

    async def get(self, path: str, **params: str | int) -> Any:
        """The JSON at ``/api/<path>``; None for 404."""
        url = f"{self._target.base_url}/api/{path}"
        try:
            response = await self._client.get(url, params=params or None)
        except httpx.TimeoutException:
            raise ManagementUnavailable("it did not answer in time") from None
        except httpx.HTTPError as exc:
            raise ManagementUnavailable(_http_error(exc)) from None
        if response.status_code == 401:
            raise ManagementUnavailable(
                f"it refused the login of user {self._target.username!r} (the user needs the "
                "management or monitoring tag, or give --management-url with other credentials)"
            )
        if response.status_code == 403:
            raise ManagementDenied(f"/api/{path.split('/')[0]}: access refused")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise ManagementUnavailable(f"it answered HTTP {response.status_code}")
        try:
            return response.json()
        except ValueError:
            raise ManagementUnavailable("it did not answer with JSON") from None


def _http_error(exc: httpx.HTTPError) -> str:
    cause: BaseException = exc
    while cause.__cause__ is not None or cause.__context__ is not None:
        nxt = cause.__cause__ or cause.__context__
        assert nxt is not None
        cause = nxt
    text = str(cause) or type(cause).__name__
    if isinstance(cause, ConnectionRefusedError) or "refused" in text.lower():
        return "connection refused"
    return mask_url(text)
