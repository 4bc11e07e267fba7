"""What a publish is, before any connection: the record of a published message, how a body
becomes bytes, and the publishing API a handler is given (:attr:`Message.publisher`).

It knows no connection, so :mod:`._message` can name the API without importing the machinery
behind it (:mod:`._publishing`), which reaches the message through the middleware.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ._errors import PayloadError

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class Published:
    """A message as it was handed to the broker and confirmed (or, in
    :func:`steadyrabbit.testing.run_handler`, recorded instead). ``delay`` is in seconds."""

    exchange: str
    routing_key: str
    body: bytes
    headers: Mapping[str, Any]
    message_id: str
    content_type: str | None
    persistent: bool = True
    delay: float | None = None

    def json(self) -> Any:
        """The body decoded as JSON (for tests)."""
        return json.loads(self.body)


class AsyncPublishing(Protocol):
    """Publishing from async code: :class:`steadyrabbit.Publisher`, and ``message.publisher``
    in a handler (bound to the worker's own publishing connection)."""

    async def publish(
        self,
        body: object,
        *,
        exchange: str = "",
        routing_key: str,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        content_type: str | None = None,
        persistent: bool = True,
        delay: float | dt.timedelta | None = None,
    ) -> str: ...


class BlockingPublishing(Protocol):
    """Publishing from sync code and threads: :class:`steadyrabbit.BlockingPublisher`, and
    ``message.blocking_publisher`` in a sync handler."""

    def publish(
        self,
        body: object,
        *,
        exchange: str = "",
        routing_key: str,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        content_type: str | None = None,
        persistent: bool = True,
        delay: float | dt.timedelta | None = None,
    ) -> str: ...


def is_json(content_type: str | None) -> bool:
    if content_type is None:
        return False
    kind = content_type.partition(";")[0].strip().lower()
    return kind == JSON or kind.endswith("+json")


def encode_body(body: object, content_type: str | None) -> tuple[bytes, str | None]:
    """``body`` as bytes, with the content type that says how it was encoded.

    Bytes go as they are; text as UTF-8; a pydantic model, a dataclass and JSON data (dicts,
    lists, numbers, with dates, UUIDs and decimals as strings) as JSON. Raises
    :class:`PayloadError`, naming the type but never a value, for anything else.
    """
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body), content_type
    if isinstance(body, str):
        return body.encode(), content_type or TEXT
    if content_type is not None and not is_json(content_type):
        raise PayloadError(
            f"a {type(body).__name__} body is sent as JSON, not as {content_type!r}: "
            f"encode it to bytes yourself to send it as that"
        )
    try:
        text = json.dumps(
            _plain(body), ensure_ascii=False, separators=(",", ":"), allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"cannot encode a {type(body).__name__} body as JSON: {exc}") from None
    return text.encode(), content_type or JSON


def _plain(value: object) -> object:
    """``value`` with pydantic models and dataclasses as dicts, for ``json.dumps``."""
    dump = getattr(value, "model_dump", None)
    if callable(dump) and not isinstance(value, type):  # a pydantic v2 model
        return dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {_key(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (uuid.UUID, decimal.Decimal)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("NaN and infinities are not JSON")
    return value


def _key(key: object) -> object:
    if isinstance(key, enum.Enum):
        return key.value
    return key


def new_message_id() -> str:
    """A fresh message id: idempotent consumers tell copies of one publish by it."""
    return uuid.uuid4().hex
