"""The demo's local web service: slow, failing now and then, and keeping count.

It stands in for the reporting backend that the relay posts contracts to. Two messages of the
backlog are poison (see :func:`pick_poison`); it refuses one and always fails on the other.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Mapping, Sequence

__all__ = ["POISON_FAILING", "POISON_REFUSED", "FlakyService", "contract_number", "pick_poison"]

#: Statuses of the two poison contracts: one the service refuses (dead-lettered at once), one
#: it always fails on (dead-lettered once the attempts are used up).
POISON_REFUSED = 422
POISON_FAILING = 500
_POISON_TEXT = {
    POISON_REFUSED: "contract {n}: unknown supplier, cannot report it",
    POISON_FAILING: "contract {n}: the reporting backend crashed on it",
}
_STATUS_TEXT = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    422: "Unprocessable Entity",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class FlakyService:
    """A slow, sometimes failing HTTP/1.1 service on 127.0.0.1 (keep-alive, one POST path).

    It answers each message by its ``X-Message-Id``: the poison ones always with their status;
    the others with 503 at ``failure_rate``, but never so often that a message would run out of
    attempts; else 200. It records what it accepted, and sets ``cut_point`` once
    ``cut_at`` distinct messages were accepted and ``all_accepted`` once every non-poison one
    was.
    """

    def __init__(
        self,
        *,
        ids: Sequence[str],
        poison: Mapping[str, int],
        delay: tuple[float, float],
        failure_rate: float,
        max_failures: int,
        cut_at: int,
        seed: int,
    ) -> None:
        self._known = set(ids)
        self._poison = dict(poison)
        self._target = len(self._known) - len(self._poison)
        self._delay = delay
        self._failure_rate = failure_rate
        self._max_failures = max_failures
        self._cut_at = cut_at
        self._rng = random.Random(seed)
        self.accepted: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()  # 5xx answers to non-poison messages
        self.server_errors = 0  # 5xx answers, the poison ones included
        self.in_flight = 0
        self.cut_point = asyncio.Event()
        self.all_accepted = asyncio.Event()
        if self._target == 0:
            self.all_accepted.set()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.url = ""

    async def __aenter__(self) -> FlakyService:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/contracts"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        # The relay's client is closed by now (worker shutdown); close what is left anyway, so
        # that every connection task ends and is collected here. Connections first: from
        # Python 3.12 on, wait_closed() waits for them.
        for writer in self._writers:
            writer.close()
        if self._connections:
            await asyncio.wait(self._connections)
        await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                headers: dict[str, str] = {}
                for line in header_lines:
                    name, _, value = line.partition(":")
                    if name:
                        headers[name.strip().lower()] = value.strip()
                # The body is not needed: the message id says which contract it is.
                await reader.readexactly(int(headers.get("content-length") or 0))
                if request_line.startswith("POST "):
                    status, text = await self._answer(headers.get("x-message-id", ""))
                else:
                    status, text = 404, "POST your contracts here"
                payload = text.encode()
                writer.write(
                    f"HTTP/1.1 {status} {_STATUS_TEXT.get(status, 'Error')}\r\n"
                    f"Content-Type: text/plain; charset=utf-8\r\n"
                    f"Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, OSError):
            pass  # the client went away or spoke something else: end this connection
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, message_id: str) -> tuple[int, str]:
        if message_id not in self._known:
            return 400, f"unknown message id {message_id!r}"
        # Drawn when the request arrives, so one seed gives one sequence of answers.
        seconds = self._rng.uniform(*self._delay)
        flaky = self._rng.random() < self._failure_rate
        self.in_flight += 1
        try:
            await asyncio.sleep(seconds)
        finally:
            self.in_flight -= 1
        status = self._poison.get(message_id)
        if status is not None:
            self.server_errors += status >= 500
            return status, _POISON_TEXT[status].format(n=contract_number(message_id))
        if flaky and self.failed[message_id] < self._max_failures:
            self.failed[message_id] += 1
            self.server_errors += 1
            return 503, "reporting backend busy, try again later"
        self.accepted[message_id] += 1
        accepted = len(self.accepted)
        if accepted >= self._cut_at:
            self.cut_point.set()
        if accepted >= self._target:
            self.all_accepted.set()
        return 200, "accepted"

    @property
    def duplicates(self) -> int:
        return sum(count - 1 for count in self.accepted.values())

    @property
    def duplicated_messages(self) -> int:
        return sum(1 for count in self.accepted.values() if count > 1)


def pick_poison(ids: Sequence[str]) -> dict[str, int]:
    """The message ids the service will always fail, with the status it answers: a fifth and
    half way into the backlog, so both are handled while the demo watches."""
    if len(ids) < 5:
        return {}
    return {ids[len(ids) // 5 - 1]: POISON_REFUSED, ids[len(ids) // 2 - 1]: POISON_FAILING}


def contract_number(message_id: str) -> int | None:
    """The contract number in a demo message id (``contract-<n>-<run>``); None for others."""
    parts = message_id.split("-")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
