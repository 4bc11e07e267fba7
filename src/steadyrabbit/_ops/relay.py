"""The relay: consume a queue and POST every message to a web service. No code to write."""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

from .._app import App
from .._errors import ConfigurationError, Reject, Retry
from .._message import Message
from .._retry import RetryPolicy
from .._url import MaskingFilter, mask_url, scrub, url_secrets

_BODY_EXCERPT = 200
_MAX_RETRY_AFTER = 86_400.0
# RFC 9110 delta-seconds: ASCII digits only (str.isdigit() also takes "²" and "٣").
_DELTA_SECONDS = re.compile(r"[0-9]+")


def _mask_httpx_log() -> None:
    # A filter on the "httpx" logger itself applies to its records wherever they are handled,
    # also when the relay runs inside an application with its own logging setup.
    httpx_log = logging.getLogger("httpx")
    if not any(isinstance(f, MaskingFilter) for f in httpx_log.filters):
        httpx_log.addFilter(MaskingFilter())


def _retryable(status: int) -> bool:
    # 408 Request Timeout, 429 Too Many Requests and server errors may succeed later; any other
    # 4xx says this request is wrong and will stay wrong.
    return status in (408, 429) or status >= 500


def retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date), if valid."""
    if value is None:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return min(float(value), _MAX_RETRY_AFTER)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(0.0, seconds), _MAX_RETRY_AFTER)


class RelayHandler:
    """POSTs each message body to ``target``.

    2xx acks; 408, 429, 5xx, a timeout or a connection error retries later (honouring
    ``Retry-After``); any other answer dead-letters with the status and the start of the body.
    ``timeout`` bounds the whole request: connecting, sending and reading the full response.
    Reasons show the target masked (see :func:`mask_url`), and the target's secrets are
    scrubbed from exception messages and response bodies quoted in them.
    """

    def __init__(self, target: str, *, timeout: float) -> None:
        self.target = target
        self._shown = mask_url(target)
        self._secrets = url_secrets(target)
        self._timeout = timeout
        self._client: httpx.AsyncClient | None = None
        _mask_httpx_log()

    async def __call__(self, message: Message) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout, follow_redirects=False)
        headers = {
            "Content-Type": message.content_type or "application/octet-stream",
            "X-Routing-Key": message.routing_key,
            "X-Redelivered": "true" if message.redelivered else "false",
        }
        if message.message_id:
            headers["X-Message-Id"] = message.message_id
            # The convention of Stripe and the IETF draft: the target can deduplicate what no
            # client can, a crash between its 2xx and the worker's done record.
            headers["Idempotency-Key"] = message.message_id
        try:
            # httpx's timeout limits each read, so a target that drips its answer could hold
            # the slot for ever; this one limits the request as a whole.
            async with asyncio.timeout(self._timeout):
                response = await self._client.post(
                    self.target, content=message.body, headers=headers
                )
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise Retry(
                f"POST {self._shown} timed out after {self._timeout:g} s ({type(exc).__name__})"
            ) from exc
        except httpx.HTTPError as exc:
            error = scrub(str(exc), self._secrets)
            raise Retry(f"POST {self._shown} failed: {type(exc).__name__}: {error}") from exc
        if response.is_success:
            return
        # Scrubbed before it is cut, so that no secret is cut in two and half of it kept.
        longest = max(map(len, self._secrets), default=0)
        body = scrub(response.text[: _BODY_EXCERPT + longest], self._secrets)
        reason = f"POST {self._shown} answered {response.status_code}: {body[:_BODY_EXCERPT]}"
        if _retryable(response.status_code):
            raise Retry(reason, delay=retry_after(response.headers.get("Retry-After")))
        raise Reject(reason)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def relay_app(
    queue: str,
    target: str,
    *,
    timeout: float = 30.0,
    concurrency: int = 1,
    prefetch: int | None = None,
    exchange: str | None = None,
    routing_key: str | None = None,
    retry: RetryPolicy | None = None,
    queue_type: str = "classic",
) -> App:
    """An app whose one handler relays ``queue`` to the HTTP(S) URL ``target``."""
    try:
        url = httpx.URL(target)
    except httpx.InvalidURL as exc:
        error = scrub(str(exc), url_secrets(target))
        raise ConfigurationError(f"malformed target URL {mask_url(target)!r}: {error}") from None
    if url.scheme not in {"http", "https"} or not url.host:
        raise ConfigurationError(
            f"malformed target URL {mask_url(target)!r}: it must be an http:// or https:// URL"
        )
    if timeout <= 0:
        raise ConfigurationError("the HTTP timeout must be > 0 seconds")
    app = App(retry=retry, queue_type=queue_type)
    handler = RelayHandler(target, timeout=timeout)
    app.add_consumer(
        handler.__call__,
        queue,
        concurrency=concurrency,
        prefetch=prefetch,
        exchange=exchange,
        routing_key=routing_key,
    )
    app.on_shutdown(handler.aclose)
    return app
