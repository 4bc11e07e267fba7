"""Dead-letter queues: ``steadyrabbit dlq list|replay|purge`` and the functions under them.

Every test prepares ``<queue>.dlq`` by publishing dead letters straight into it, with the
headers steadyrabbit puts on them, then looks at the broker. Counting note: ``queue.declare-ok``
counts *ready* messages only and may lag behind requeues; counts are compared once the
connection that held messages has closed, by then every requeue has been processed.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pika
import pika.spec
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from steadyrabbit import App, Message, Properties, Reject, Worker
from steadyrabbit import _headers as h
from steadyrabbit._errors import ConfigurationError, PublishRefusedError
from steadyrabbit._ops.dlq import (
    DeadLetter,
    DeadLetterReport,
    _replay_properties,
    error_headline,
    exception_name,
    format_dead_letters,
    list_dead_letters,
    purge_dead_letters,
    replay_dead_letters,
    show_dead_letter,
)
from steadyrabbit._preview import PREVIEW_CHARS, body_preview
from tests._strategies import HEADER_VALUES
from tests.conftest import MAIN_URL, SESSION_PREFIX, Admin, MakeSettings, eventually

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
ERROR_PREFIX = "steadyrabbit: error: "
EXIT_USAGE = 2
USER_HEADERS = {"tenant": "acme", "trace": "t-1"}


# -- preparing dead letters --------------------------------------------------------------------


@dataclass(frozen=True)
class Letter:
    body: bytes
    exception: str = "ValueError"
    reason: str = "ValueError: amount must be positive"
    attempts: int | None = 5
    queue_header: bool = True  # False: a dead letter without x-steadyrabbit-queue


def dead_letter_properties(queue: str, index: int, letter: Letter) -> pika.BasicProperties:
    """The properties of a dead letter as steadyrabbit's consumer writes them."""
    ours: dict[str, Any] = {
        h.REASON: letter.reason,
        h.EXCEPTION: letter.exception,
        h.FIRST_FAILED_AT: f"2024-05-01T12:00:{index % 60:02d}.000+00:00",
        h.FAILED_AT: f"2024-05-01T12:05:{index % 60:02d}.500+00:00",
        h.EXCHANGE: "orders-exchange",
        h.ROUTING_KEY: f"orders.created.{index}",
        h.PUBLISH_ID: str(index + 1),
    }
    if letter.attempts is not None:
        ours[h.ATTEMPTS] = letter.attempts
    if letter.queue_header:
        ours[h.QUEUE] = queue
    return pika.BasicProperties(
        content_type="application/json",
        content_encoding="utf-8",
        headers={**USER_HEADERS, "index": index, **ours},
        delivery_mode=2,
        correlation_id=f"corr-{index}",
        reply_to="replies",
        message_id=f"msg-{index}",
        timestamp=1_714_564_800 + index,
        type="order.created",
        app_id="shop",
    )


def fill_dlq(admin: Admin, queue: str, letters: list[Letter]) -> None:
    """Declare ``queue`` and ``queue.dlq`` (durable, as steadyrabbit does) and fill the DLQ."""
    admin.declare(queue)
    admin.declare(f"{queue}.dlq")
    with pika.BlockingConnection(pika.URLParameters(admin.url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        for index, letter in enumerate(letters):
            props = dead_letter_properties(queue, index, letter)
            channel.basic_publish("", f"{queue}.dlq", letter.body, props)


def bodies(messages: list[tuple[pika.BasicProperties, bytes]]) -> list[bytes]:
    return [body for _props, body in messages]


# -- running the command line ------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    status: int
    stdout: str
    stderr: str


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("STEADYRABBIT_")}


def steadyrabbit(
    *args: str, url: bool = True, timeout: float = 30, env: dict[str, str] | None = None
) -> Result:
    """``python -m steadyrabbit ARGS --url MAIN_URL``, stdin not a terminal, stdout a pipe."""
    done = subprocess.run(
        [sys.executable, "-m", "steadyrabbit", *args, *(["--url", MAIN_URL] if url else [])],
        cwd=ROOT,
        env={**_env(), **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Result(done.returncode, done.stdout, done.stderr)


def one_error_line(result: Result, status: int) -> str:
    everything = result.stdout + result.stderr
    assert "Traceback" not in everything, everything
    assert result.status == status, everything
    assert result.stdout == "", everything
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(ERROR_PREFIX), result.stderr
    return lines[0].removeprefix(ERROR_PREFIX)


def succeeded(result: Result) -> str:
    everything = result.stdout + result.stderr
    assert result.status == 0, everything
    assert "Traceback" not in everything, everything
    return result.stdout


# -- list --------------------------------------------------------------------------------------


def test_list_leads_with_the_error_and_leaves_the_queue_as_it_was(
    admin: Admin, queue_name: str
) -> None:
    letters = [
        Letter(b'{"order": 1}', "ValueError", "ValueError: amount must be positive", 5),
        Letter(b'{"order": 2}', "httpx.ConnectTimeout", "ConnectTimeout: timed out", 3),
        Letter(b"line one\nline two\x00", "KeyError", "KeyError: 'sku'\nwith a second line", None),
        Letter(b"x" * 300, "RuntimeError", "r" * 200, 1),
    ]
    fill_dlq(admin, queue_name, letters)

    output = succeeded(steadyrabbit("dlq", "list", queue_name))  # piped: nothing is cut
    lines = output.splitlines()
    assert lines[0] == f"{queue_name}.dlq: 4 messages"
    header, *rows = lines[1:]
    assert header.split() == ["#", "ERROR", "EXCEPTION", "FAILED", "AT", "ATTEMPTS", "BODY"]
    assert len(rows) == 4
    # The error first, without the type it repeats; then the type, when, how many attempts.
    assert rows[0].split("  ")[0:2] == ["1", "amount must be positive"]
    assert rows[0].split()[-5:-1] == ["ValueError", "2024-05-01T12:05:00Z", "5", '{"order":']
    assert rows[1].split()[:3] == ["2", "timed", "out"]
    assert rows[1].split()[3:6] == ["ConnectTimeout", "2024-05-01T12:05:01Z", "3"]
    assert rows[2].startswith("3  'sku'\\nwith a second line  ")  # one line per message
    assert rows[2].split()[5:8] == ["KeyError", "2024-05-01T12:05:02Z", "-"]  # no attempts
    assert rows[2].endswith("line one\\nline two\\x00")
    assert "r" * 200 in rows[3]  # the whole error
    assert rows[3].endswith("x" * (PREVIEW_CHARS - 3) + "...")

    limited = succeeded(steadyrabbit("dlq", "list", queue_name, "--limit", "2")).splitlines()
    assert limited[0] == f"{queue_name}.dlq: 4 messages (showing the first 2; see --limit)"
    assert len(limited) == 1 + 1 + 2

    # Peeking lost nothing and moved nothing: same messages, same order, same headers.
    left = admin.drain(f"{queue_name}.dlq")
    assert bodies(left) == [letter.body for letter in letters]
    for index, (props, _body) in enumerate(left):
        expected = dead_letter_properties(queue_name, index, letters[index])
        assert props.headers == expected.headers
        assert props.message_id == expected.message_id


RELAY_REASON = (
    "gave up after 5 attempts: POST http://reports.example/api/contracts/v2/upload answered "
    "503: upstream busy, try again later (maintenance window until 14:00 UTC)"
)


@pytest.mark.parametrize("columns", [80, 100, 200])
def test_list_shows_the_relay_status_and_body_first_within_the_terminal(
    admin: Admin, queue_name: str, columns: int
) -> None:
    """Issue 8: the reason was cut at 40 characters, leaving `POST http://host/...`, and the
    exception read steadyrabbit._errors.Retry. Now the status and body come first, the row
    fits the terminal, and a wide one shows the whole error."""
    fill_dlq(
        admin,
        queue_name,
        [
            Letter(b'{"contract": 7}', "steadyrabbit._errors.Retry", RELAY_REASON, 5),
            Letter(b"{}", "steadyrabbit._errors.Reject", "POST http://r.ex/ answered 404: no", 1),
            Letter(b"{}", "httpx.ReadTimeout", "POST http://r.ex/ timed out after 30 s", 2),
        ],
    )

    result = steadyrabbit("dlq", "list", queue_name, env={"COLUMNS": str(columns)})

    header, *rows = succeeded(result).splitlines()[1:]
    assert all(len(line) <= columns for line in [header, *rows]), (columns, rows)
    error = "503: upstream busy, try again later (maintenance window until 14:00 UTC)"
    first = rows[0].split()
    assert first[:3] == ["1", "503:", "upstream"]
    if columns >= 200:
        assert error in rows[0]
        assert rows[0].endswith('{"contract": 7}')
    else:  # the error takes the room; the body is left to `dlq show`
        assert rows[0].split("  ")[1].endswith("...")
        assert len(rows[0].split("  ")[1]) >= columns - 50
        assert "BODY" not in header
    assert "steadyrabbit" not in rows[0]
    assert "Retry" not in rows[0]
    assert rows[1].split()[:4] == ["2", "404:", "no", "-"]  # a Reject: no exception type
    assert rows[2].split()[:8] == ["3", "timed", "out", "after", "30", "s", "ReadTimeout",
                                   "2024-05-01T12:05:02Z"]  # fmt: skip


def test_list_json(admin: Admin, queue_name: str) -> None:
    fill_dlq(admin, queue_name, [Letter(f"body {i}".encode()) for i in range(3)])

    document = json.loads(
        succeeded(steadyrabbit("dlq", "list", queue_name, "--json", "--limit", "2"))
    )

    assert document["queue"] == queue_name
    assert document["dead_letter_queue"] == f"{queue_name}.dlq"
    assert document["count"] == 3
    assert [entry["body_preview"] for entry in document["entries"]] == ["body 0", "body 1"]
    first = document["entries"][0]
    assert first["position"] == 1
    assert first["exception"] == "ValueError"
    assert first["reason"] == "ValueError: amount must be positive"
    assert first["attempts"] == 5
    assert first["failed_at"] == "2024-05-01T12:05:00.500+00:00"
    assert first["queue"] == queue_name
    assert first["exchange"] == "orders-exchange"
    assert first["routing_key"] == "orders.created.0"
    assert first["message_id"] == "msg-0"
    assert admin.counts(f"{queue_name}.dlq") == (3, 0)


def test_list_an_empty_dead_letter_queue(admin: Admin, queue_name: str) -> None:
    fill_dlq(admin, queue_name, [])
    assert succeeded(steadyrabbit("dlq", "list", queue_name)) == f"{queue_name}.dlq is empty\n"


async def test_list_dead_letters_from_code(
    admin: Admin, queue_name: str, make_settings: MakeSettings
) -> None:
    letters = [
        Letter("café\x00\n".encode() + b"\xff", attempts=None, queue_header=False),
        Letter(b"y" * 500, "TimeoutError", "took too long"),
    ]
    fill_dlq(admin, queue_name, letters)

    report = await list_dead_letters(make_settings(), queue_name, limit=1)

    assert (report.count, len(report.entries)) == (2, 1)
    entry = report.entries[0]
    assert entry.body_preview == "café\\x00\\n\\xff"
    assert entry.body_size == len(letters[0].body)
    assert entry.attempts is None
    assert entry.queue is None
    assert entry.exception == "ValueError"
    assert entry.first_failed_at == "2024-05-01T12:00:00.000+00:00"

    report = await list_dead_letters(make_settings(), queue_name)
    assert [e.position for e in report.entries] == [1, 2]
    assert len(report.entries[1].body_preview) == PREVIEW_CHARS
    assert report.entries[1].exception == "TimeoutError"
    assert bodies(admin.drain(f"{queue_name}.dlq")) == [letter.body for letter in letters]


def test_body_preview_never_cuts_an_escape_in_half() -> None:
    assert body_preview(b"abc") == "abc"
    assert body_preview(b"a" * 80) == "a" * 80
    assert body_preview(b"a" * 81) == "a" * 77 + "..."
    assert body_preview(b"\x00" * 40) == "\\x00" * 19 + "..."
    assert body_preview("\u2028\U0001f600 ok") == "\\u2028\U0001f600 ok"
    for size in range(120):
        preview = body_preview(b"a\x01" * size)
        assert len(preview) <= PREVIEW_CHARS
        assert preview.endswith(("...", "\\x01", "a")) or preview == ""


# The exception types a dead letter can name: the control-flow ones (shown as nothing), dotted
# names, and arbitrary text from a message that did not come from steadyrabbit.
_EXCEPTIONS = st.one_of(
    st.none(),
    st.sampled_from(
        ["steadyrabbit._errors.Retry", "steadyrabbit._errors.Reject", "ValueError",
         "httpx.ReadTimeout", "json.decoder.JSONDecodeError", "CrashLoop"]
    ),
    st.text(max_size=60),
)  # fmt: skip
_REASONS = st.one_of(
    st.none(),
    st.text(max_size=300),
    st.builds(
        lambda attempts, path, status, body: (
            f"gave up after {attempts} attempts: POST http://host{path} answered {status}: {body}"
        ),
        st.integers(1, 99),
        st.text(alphabet="/abc.-_", max_size=40),
        st.integers(100, 599),
        st.text(max_size=200),
    ),
)
_STAMPS = st.one_of(
    st.none(),
    st.datetimes(timezones=st.just(dt.UTC)).map(lambda d: d.isoformat(timespec="milliseconds")),
    st.text(max_size=40),
)
_LETTERS = st.builds(
    DeadLetter,
    position=st.just(0),
    reason=_REASONS,
    exception=_EXCEPTIONS,
    attempts=st.none() | st.integers(0, 10**6),
    first_failed_at=_STAMPS,
    failed_at=_STAMPS,
    queue=st.none(),
    exchange=st.none(),
    routing_key=st.none(),
    message_id=st.none(),
    body_preview=st.binary(max_size=200).map(body_preview),
    body_size=st.integers(0, 10**6),
)
# Wide enough for the fixed columns at their widest (# to 3 digits, exception 30, failure time
# 32, attempts 8, gaps) and the error's minimum of 20 characters.
_ROOMY = 3 + 30 + 32 + 8 + 4 * 2 + 20


@given(
    letters=st.lists(_LETTERS, min_size=1, max_size=12),
    width=st.none() | st.integers(_ROOMY, 400),
)
def test_every_table_row_is_one_line_within_the_width_leading_with_its_error(
    letters: list[DeadLetter], width: int | None
) -> None:
    entries = tuple(replace(letter, position=i) for i, letter in enumerate(letters, start=1))
    report = DeadLetterReport("q", "q.dlq", len(entries) + 3, entries)

    lines = format_dead_letters(report, width).split("\n")

    assert len(lines) == 2 + len(entries)
    position_width = len(str(len(entries)))
    for entry, line in zip(entries, lines[2:], strict=True):
        if width is not None:
            assert len(line) <= width
        error = body_preview(error_headline(entry), sys.maxsize)
        cell = line[position_width + 2 :]
        fits = width is None or len(error) <= width - _ROOMY + 20
        # At least 20 characters, less an escape sequence (up to 10) never cut in half.
        assert cell.startswith(error if fits else error[:8]), (error, cell)
        assert len(line) <= (width or len(line))


def test_the_error_headline_drops_what_repeats() -> None:
    def letter(reason: str | None, exception: str | None = None) -> DeadLetter:
        return DeadLetter(0, reason, exception, 1, None, None, None, None, None, None, "", 0)

    assert error_headline(letter(RELAY_REASON, "steadyrabbit._errors.Retry")) == (
        "503: upstream busy, try again later (maintenance window until 14:00 UTC)"
    )
    refused = "POST http://h/x failed: ConnectError: [Errno 111] Connection refused"
    assert error_headline(letter(refused, "httpx.ConnectError")) == "[Errno 111] Connection refused"
    assert error_headline(letter("ValueError: bad", "ValueError")) == "bad"
    undecodable = "undecodable body: JSONDecodeError: x"
    assert error_headline(letter(undecodable, "json.decoder.JSONDecodeError")) == undecodable
    assert error_headline(letter("ValueError: ", "ValueError")) == "ValueError: "  # never empty
    assert error_headline(letter(None)) == "-"
    assert exception_name("steadyrabbit._errors.Retry") is None
    assert exception_name("httpx.ReadTimeout") == "ReadTimeout"


# -- show --------------------------------------------------------------------------------------


def test_show_prints_one_message_whole_and_leaves_the_queue_as_it_was(
    admin: Admin, queue_name: str
) -> None:
    body = b'{"contract": 7, "note": "line one\nline two \x1b[31mred\x1b[0m"}'
    letters = [Letter(b"first"), Letter(body, "steadyrabbit._errors.Retry", RELAY_REASON, 5)]
    letters.append(Letter(b"third"))
    fill_dlq(admin, queue_name, letters)

    output = succeeded(steadyrabbit("dlq", "show", queue_name, "2"))

    lines = output.splitlines()
    assert lines[0] == f"{queue_name}.dlq: message 2 of 3"
    assert f"  {h.REASON}: {RELAY_REASON}" in lines  # whole, never cut
    assert f"  {h.EXCEPTION}: steadyrabbit._errors.Retry" in lines
    assert f"  {h.ATTEMPTS}: 5" in lines
    assert f"  {h.FIRST_FAILED_AT}: 2024-05-01T12:00:01.000+00:00" in lines
    assert f"  {h.FAILED_AT}: 2024-05-01T12:05:01.500+00:00" in lines
    assert f"  {h.QUEUE}: {queue_name}" in lines
    assert f"  {h.EXCHANGE}: orders-exchange" in lines
    assert f"  {h.ROUTING_KEY}: orders.created.1" in lines
    assert f"  {h.PUBLISH_ID}: 2" in lines
    assert lines.index("properties:") > lines.index("steadyrabbit headers:")
    for line in (
        "  content_type: application/json",
        "  delivery_mode: 2",
        "  correlation_id: corr-1",
        "  reply_to: replies",
        "  message_id: msg-1",
        "  timestamp: 1714564801 (2024-05-01T12:00:01Z)",
        "  type: order.created",
        "  app_id: shop",
        "headers:",
        "  tenant: acme",
        "  trace: t-1",
        "  index: 1",
        f"body: {len(body)} bytes, UTF-8 text",
    ):
        assert line in lines, line
    # The body whole, its line break kept, the terminal's escape character shown, not sent.
    assert lines[-2:] == [
        '{"contract": 7, "note": "line one',
        'line two \\x1b[31mred\\x1b[0m"}',
    ]
    assert "\x1b" not in output

    # Nothing moved.
    assert bodies(admin.drain(f"{queue_name}.dlq")) == [b"first", body, b"third"]


def test_show_a_binary_body_as_a_hex_dump_and_as_json(admin: Admin, queue_name: str) -> None:
    body = bytes(range(256)) + b"\xff\xfe"
    fill_dlq(admin, queue_name, [Letter(body, attempts=None, queue_header=False)])
    with pika.BlockingConnection(pika.URLParameters(admin.url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        history: dict[str, Any] = {
            "x-death": [{"count": 1, "queue": "elsewhere", "reason": "rejected"}]
        }
        channel.basic_publish("", f"{queue_name}.dlq", "café".encode(),
                              pika.BasicProperties(headers=history))  # fmt: skip

    text = succeeded(steadyrabbit("dlq", "show", queue_name, "1")).splitlines()
    assert f"body: {len(body)} bytes, not UTF-8 text (hex)" in text
    assert (
        "00000000  00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f  |................|" in text
    )
    assert "00000040  40 41 42 43 44 45 46 47 48 49 4a 4b 4c 4d 4e 4f  |@ABCDEFGHIJKLMNO|" in text
    assert text[-1] == "00000100  ff fe" + " " * (47 - 5) + "  |..|"
    other = succeeded(steadyrabbit("dlq", "show", queue_name, "2")).splitlines()
    assert "steadyrabbit headers: none" in other
    assert '  x-death: [{"count": 1, "queue": "elsewhere", "reason": "rejected"}]' in other
    assert other[-2:] == ["body: 5 bytes, UTF-8 text", "café"]

    document = json.loads(succeeded(steadyrabbit("dlq", "show", queue_name, "1", "--json")))
    assert document["position"] == 1
    assert document["count"] == 2
    assert document["dead_letter_queue"] == f"{queue_name}.dlq"
    assert document["body"] is None
    assert base64.b64decode(document["body_base64"]) == body
    assert document["body_size"] == len(body)
    assert document["steadyrabbit"][h.REASON] == "ValueError: amount must be positive"
    assert h.ATTEMPTS not in document["steadyrabbit"]
    assert document["properties"]["message_id"] == "msg-0"
    assert document["properties"]["timestamp"] == 1_714_564_800
    assert document["headers"] == {**USER_HEADERS, "index": 0}
    second = json.loads(succeeded(steadyrabbit("dlq", "show", queue_name, "2", "--json")))
    assert second["body"] == "café"
    assert second["headers"]["x-death"][0]["queue"] == "elsewhere"
    assert admin.counts(f"{queue_name}.dlq") == (2, 0)


def test_show_masks_passwords_in_headers(admin: Admin, queue_name: str) -> None:
    reason = "OperationalError: cannot reach postgres://app:s3cret-pw@db.internal/orders"
    fill_dlq(admin, queue_name, [Letter(b"{}", "OperationalError", reason)])

    outputs = [
        steadyrabbit("dlq", "show", queue_name, "1"),
        steadyrabbit("dlq", "show", queue_name, "1", "--json"),
        steadyrabbit("dlq", "list", queue_name),
        steadyrabbit("dlq", "list", queue_name, "--json"),
    ]

    for result in outputs:
        assert "app:****@db.internal" in succeeded(result)
        assert "s3cret-pw" not in result.stdout + result.stderr


@pytest.mark.parametrize("position", ["4", "0", "x"])
def test_show_a_message_that_is_not_there_is_one_clear_line(
    admin: Admin, queue_name: str, position: str
) -> None:
    fill_dlq(admin, queue_name, [Letter(b"1"), Letter(b"2"), Letter(b"3")])

    message = one_error_line(steadyrabbit("dlq", "show", queue_name, position), EXIT_USAGE)

    if position == "4":
        assert message == f"there is no message 4 in {queue_name}.dlq: it holds 3 messages"
    else:
        assert "'N'" in message
    assert bodies(admin.drain(f"{queue_name}.dlq")) == [b"1", b"2", b"3"]


# -- replay ------------------------------------------------------------------------------------


async def test_replay_moves_every_message_back_once_without_its_failure_record(
    admin: Admin, queue_name: str, make_settings: MakeSettings
) -> None:
    letters = [Letter(f"order {i}".encode(), queue_header=i != 2) for i in range(5)]
    fill_dlq(admin, queue_name, letters)
    calls: list[tuple[int, int]] = []

    result = await replay_dead_letters(
        make_settings(), queue_name, progress=lambda done, total: calls.append((done, total))
    )

    assert (result.total, result.replayed, result.skipped, result.remaining) == (5, 5, 0, 0)
    assert not result.stopped
    assert calls == [(i, 5) for i in range(6)]
    replayed = admin.drain(queue_name)
    assert bodies(replayed) == [letter.body for letter in letters]
    for index, (props, _body) in enumerate(replayed):
        headers = props.headers or {}
        # The failure record is gone; where the message came from stays, for its handler (a
        # copy without a message id carries a publish id of its own, hidden from handlers).
        publish_id = set() if props.message_id else {h.PUBLISH_ID}
        assert {k for k in headers if k.startswith(h.PREFIX)} == {
            h.EXCHANGE, h.ROUTING_KEY, *publish_id
        }  # fmt: skip
        assert headers[h.EXCHANGE] == "orders-exchange"
        assert headers[h.ROUTING_KEY] == f"orders.created.{index}"
        assert {k: v for k, v in headers.items() if not k.startswith(h.PREFIX)} == {
            **USER_HEADERS,
            "index": index,
        }
        assert h.attempts(headers) == 0
        assert props.delivery_mode == 2
        assert props.content_type == "application/json"
        assert props.content_encoding == "utf-8"
        assert props.correlation_id == f"corr-{index}"
        assert props.reply_to == "replies"
        assert props.message_id == f"msg-{index}"
        assert props.timestamp == 1_714_564_800 + index
        assert props.type == "order.created"
        assert props.app_id == "shop"
    assert admin.counts(f"{queue_name}.dlq") == (0, 0)


@pytest.fixture
def topic_exchange(admin: Admin, queue_name: str) -> Iterator[str]:
    name = f"{queue_name}-topic"
    with pika.BlockingConnection(pika.URLParameters(admin.url)) as connection:
        connection.channel().exchange_declare(name, "topic", durable=True)
    yield name
    admin.delete_exchange(name)


def peek(admin: Admin, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
    """The ready messages of ``queue``, given back in order (a passive look, as dlq list does)."""
    with pika.BlockingConnection(pika.URLParameters(admin.url)) as connection:
        channel = connection.channel()
        seen: list[tuple[pika.BasicProperties, bytes]] = []
        last = 0
        while True:
            method, props, body = channel.basic_get(queue)
            if method is None or props is None or body is None:
                break
            last = int(method.delivery_tag or 0)
            seen.append((props, body))
        if last:
            channel.basic_nack(last, multiple=True, requeue=True)
        return seen


@dataclass(frozen=True)
class Seen:
    exchange: str
    routing_key: str
    attempt: int
    headers: dict[str, Any]


async def test_a_replayed_message_keeps_its_origin_and_goes_nowhere_else(
    admin: Admin, queue_name: str, topic_exchange: str, make_settings: MakeSettings
) -> None:
    """Issue 8: after a replay the original routing key was gone. Now a handler sees the same
    exchange, routing key and attempt number as on the first delivery, and the replay neither
    fans out by the original's CC header nor claims its user_id."""
    cc_queue = f"{queue_name}-cc"
    admin.declare(queue_name)
    admin.declare(cc_queue)
    with pika.BlockingConnection(pika.URLParameters(admin.url)) as connection:
        channel = connection.channel()
        channel.queue_bind(queue_name, topic_exchange, "a.b.c")
        channel.queue_bind(cc_queue, topic_exchange, cc_queue)
    # CC names a queue both as a topic key and as a default-exchange route, so a copy that
    # restored it would land there through either exchange.
    sent = pika.BasicProperties(
        delivery_mode=2, headers={"CC": [cc_queue], "tenant": "acme"}, user_id="guest",
        message_id="contract-7",
    )  # fmt: skip
    admin.publish(queue_name, [b"contract 7"], exchange=topic_exchange, routing_key="a.b.c",
                  properties=sent)  # fmt: skip
    assert bodies(admin.drain(cc_queue)) == [b"contract 7"]  # CC works on the original
    seen: list[Seen] = []
    app = App()

    @app.consumer(queue_name)
    def handle(message: Message) -> None:
        seen.append(Seen(message.exchange, message.routing_key, message.attempt, message.headers))
        if len(seen) == 1:
            raise Reject("not yet")

    settings = make_settings()

    async def work_until(done: Callable[[Worker], bool]) -> None:
        async with Worker(app, settings) as worker:
            await eventually(lambda: done(worker), what="the handler's outcome")

    try:
        await work_until(lambda worker: worker.stats.dead_lettered == 1)
        result = await replay_dead_letters(settings, queue_name)
        assert result.replayed == 1

        [(props, body)] = peek(admin, queue_name)
        headers = props.headers or {}
        assert body == b"contract 7"
        assert headers[h.EXCHANGE] == topic_exchange
        assert headers[h.ROUTING_KEY] == "a.b.c"
        assert h.ATTEMPTS not in headers
        assert not {h.REASON, h.EXCEPTION, h.FAILED_AT, h.FIRST_FAILED_AT} & set(headers)
        assert "CC" not in headers
        assert "BCC" not in headers
        assert headers[h.CC] == [cc_queue]  # kept for the record
        assert props.user_id is None
        assert headers[h.USER_ID] == "guest"
        assert headers["tenant"] == "acme"
        assert props.message_id == "contract-7"
        assert admin.counts(cc_queue) == (0, 0)

        await work_until(lambda worker: worker.stats.acked == 1)
        assert [(s.exchange, s.routing_key, s.attempt) for s in seen] == [
            (topic_exchange, "a.b.c", 1),
            (topic_exchange, "a.b.c", 1),  # attempts start again after a replay
        ]
        assert h.PUBLISH_ID not in seen[1].headers
        assert admin.counts(cc_queue) == (0, 0)
        assert admin.counts(queue_name) == (0, 0)
    finally:
        admin.delete(cc_queue)


_USER_HEADERS = st.dictionaries(
    st.text(min_size=1, max_size=12).filter(
        lambda key: not key.startswith(h.PREFIX) and key not in ("CC", "BCC", "x-delivery-count")
        and not key.startswith(("x-death", "x-first-death", "x-last-death"))
    ),
    HEADER_VALUES,
    max_size=5,
)  # fmt: skip
_OURS = st.fixed_dictionaries(
    {},
    optional={
        h.ATTEMPTS: st.integers(0, 100),
        h.REASON: st.text(max_size=30),
        h.EXCEPTION: st.text(max_size=30),
        h.FAILED_AT: st.text(max_size=30),
        h.FIRST_FAILED_AT: st.text(max_size=30),
        h.QUEUE: st.text(max_size=30),
        h.PUBLISH_ID: st.text(max_size=10),
        h.EXCHANGE: st.text(max_size=30),
        h.ROUTING_KEY: st.text(max_size=30),
        h.CC: st.lists(st.text(max_size=10), max_size=2),
        h.USER_ID: st.text(max_size=10),
        h.PREFIX + "from-a-later-version": st.text(max_size=10),
        "x-delivery-count": st.integers(0, 100),
        "x-first-death-reason": st.just("expired"),
    },
)
_KEPT = {h.EXCHANGE, h.ROUTING_KEY, h.CC, h.BCC, h.USER_ID}


@given(
    user=_USER_HEADERS,
    ours=_OURS,
    cc=st.none() | st.lists(st.text(max_size=10), max_size=3),
    bcc=st.none() | st.lists(st.text(max_size=10), max_size=3),
    user_id=st.none() | st.text(max_size=10),
)
def test_replay_headers_keep_the_origin_and_never_route_or_claim_a_user(
    user: dict[str, Any],
    ours: dict[str, Any],
    cc: list[str] | None,
    bcc: list[str] | None,
    user_id: str | None,
) -> None:
    """Any dead letter, also one made before CC/BCC were moved aside: the replayed copy keeps
    the user headers and the origin, records CC/BCC/user_id, and carries nothing else of ours."""
    found = {**user, **ours}
    if cc is not None:
        found["CC"] = cc
    if bcc is not None:
        found["BCC"] = bcc
    props = Properties(headers=found, user_id=user_id, delivery_mode=1)

    copy = _replay_properties(props)

    headers = copy.headers or {}
    assert copy.user_id is None
    assert copy.delivery_mode == 2
    assert "CC" not in headers
    assert "BCC" not in headers
    assert {k for k in headers if k.startswith(h.PREFIX)} <= _KEPT
    assert "x-delivery-count" not in headers
    assert not any(k.startswith(("x-death", "x-first-death", "x-last-death")) for k in headers)
    assert {k: v for k, v in headers.items() if k not in _KEPT} == user
    for key in (h.EXCHANGE, h.ROUTING_KEY):
        assert headers.get(key) == ours.get(key)
    # An existing record wins over a header found on the dead letter itself.
    assert headers.get(h.CC) == ours.get(h.CC, cc)
    assert headers.get(h.BCC) == bcc
    assert headers.get(h.USER_ID) == ours.get(h.USER_ID, user_id)


@hypothesis_settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    user=_USER_HEADERS,
    ours=_OURS,
    routed=st.lists(st.sampled_from(["self", "other"]), max_size=3),
    as_guest=st.booleans(),
)
async def test_generated_dead_letters_replay_to_their_queue_alone(
    admin: Admin,
    user: dict[str, Any],
    ours: dict[str, Any],
    routed: list[str],
    as_guest: bool,
    make_settings: MakeSettings,
) -> None:
    """On the broker: dead letters (old ones too) whose CC/BCC name the queue or another one,
    with and without a user_id, are replayed exactly once, to their queue only."""
    queue = f"{SESSION_PREFIX}replay-{uuid.uuid4().hex[:8]}"
    other = f"{queue}-other"
    names = {"self": queue, "other": other}
    ours = {**ours, h.QUEUE: queue}
    found = {**user, **ours, **({"CC": [names[t] for t in routed]} if routed else {})}
    if routed:
        found["BCC"] = [names[t] for t in reversed(routed)]
    for name in (queue, other, f"{queue}.dlq"):
        admin.declare(name)
    try:
        props = pika.BasicProperties(
            delivery_mode=2, headers=found, user_id="guest" if as_guest else None
        )
        admin.publish(f"{queue}.dlq", [b"m"], properties=props)
        admin.drain(queue)  # what the CC/BCC of this publish put there: not the replay's doing
        admin.drain(other)

        result = await replay_dead_letters(make_settings(), queue)

        assert result.replayed == 1
        [(replayed, body)] = admin.drain(queue)
        assert body == b"m"
        assert replayed.user_id is None
        assert {k: v for k, v in (replayed.headers or {}).items() if k not in _KEPT} == {
            **user, h.PUBLISH_ID: (replayed.headers or {})[h.PUBLISH_ID]
        }  # fmt: skip
        assert admin.counts(other) == (0, 0)
        assert admin.counts(f"{queue}.dlq") == (0, 0)
    finally:
        admin.delete(queue, other, f"{queue}.dlq")


async def test_a_quorum_dead_letter_queue_count_of_looks_is_not_replayed(
    admin: Admin, queue_name: str, make_settings: MakeSettings
) -> None:
    """A quorum queue counts every delivery in x-delivery-count, the looks of `dlq list` and
    `dlq show` too: that count belongs to the dead letter, not to the replayed message."""
    admin.declare(queue_name)
    admin.declare(f"{queue_name}.dlq", {"x-queue-type": "quorum"})
    props = dead_letter_properties(queue_name, 0, Letter(b"q"))
    admin.publish(f"{queue_name}.dlq", [b"q"], properties=props)
    for _ in range(2):
        report = await list_dead_letters(make_settings(), queue_name)
        assert report.count == 1
    [(looked_at, _)] = peek(admin, f"{queue_name}.dlq")
    looks = (looked_at.headers or {})["x-delivery-count"]
    assert isinstance(looks, int)
    assert looks >= 2  # what the broker adds

    await replay_dead_letters(make_settings(), queue_name)

    [(replayed, body)] = admin.drain(queue_name)
    assert body == b"q"
    assert "x-delivery-count" not in (replayed.headers or {})


async def test_replay_sends_each_message_to_the_queue_it_failed_in(
    admin: Admin, queue_name: str, make_settings: MakeSettings
) -> None:
    other = f"{queue_name}-other"
    admin.declare(other)
    try:
        fill_dlq(admin, queue_name, [Letter(b"mine"), Letter(b"theirs"), Letter(b"mine too")])
        # The second dead letter was consumed from another queue (a shared DLQ name is unusual,
        # but the header is what decides).
        with pika.BlockingConnection(pika.URLParameters(admin.url)) as connection:
            channel = connection.channel()
            channel.queue_purge(f"{queue_name}.dlq")
            channel.confirm_delivery()
            for index, (body, target) in enumerate(
                [(b"mine", queue_name), (b"theirs", other), (b"mine too", queue_name)]
            ):
                props = dead_letter_properties(target, index, Letter(body))
                channel.basic_publish("", f"{queue_name}.dlq", body, props)

        result = await replay_dead_letters(make_settings(), queue_name)

        assert result.replayed == 3
        assert bodies(admin.drain(queue_name)) == [b"mine", b"mine too"]
        assert bodies(admin.drain(other)) == [b"theirs"]
    finally:
        admin.delete(other)


def test_replay_with_a_limit_leaves_the_rest_in_order(admin: Admin, queue_name: str) -> None:
    letters = [Letter(f"m{i}".encode()) for i in range(6)]
    fill_dlq(admin, queue_name, letters)

    output = succeeded(steadyrabbit("dlq", "replay", queue_name, "--limit", "2", "--yes"))

    dlq = f"{queue_name}.dlq"
    assert output == f"replayed 2 of 6 messages from {dlq}; 4 remain in {dlq}\n"
    assert bodies(admin.drain(queue_name)) == [b"m0", b"m1"]
    assert bodies(admin.drain(f"{queue_name}.dlq")) == [b"m2", b"m3", b"m4", b"m5"]


def test_replay_with_an_error_filter_leaves_the_others_in_order(
    admin: Admin, queue_name: str
) -> None:
    letters = [
        Letter(b"a", "ValueError", "ValueError: bad amount"),
        Letter(b"b", "httpx.ConnectTimeout", "ConnectTimeout: timed out"),
        Letter(b"c", "KeyError", "KeyError: 'sku'"),
        Letter(b"d", "RuntimeError", "upstream TIMEOUT after 30 s"),  # matches by its reason
        Letter(b"e", "ValueError", "ValueError: bad currency"),
        Letter(b"f", "httpx.ReadTimeout", "ReadTimeout"),
    ]
    fill_dlq(admin, queue_name, letters)

    output = succeeded(steadyrabbit("dlq", "replay", queue_name, "--error", "timeout", "--yes"))

    assert output.startswith(f"replayed 3 of 6 messages from {queue_name}.dlq (3 skipped")
    assert bodies(admin.drain(queue_name)) == [b"b", b"d", b"f"]
    left = admin.drain(f"{queue_name}.dlq")
    assert bodies(left) == [b"a", b"c", b"e"]
    # The skipped ones are untouched, steadyrabbit's headers included.
    exceptions = [(p.headers or {}).get(h.EXCEPTION) for p, _ in left]
    assert exceptions == ["ValueError", "KeyError", "ValueError"]


def test_replay_one_message_by_its_id_leaves_the_others_in_order(
    admin: Admin, queue_name: str
) -> None:
    fill_dlq(admin, queue_name, [Letter(f"m{i}".encode()) for i in range(5)])
    # A second dead letter with the same id (a message that failed twice): both go back.
    again = dead_letter_properties(queue_name, 2, Letter(b"m2 again"))
    admin.publish(f"{queue_name}.dlq", [b"m2 again"], properties=again)

    output = succeeded(steadyrabbit("dlq", "replay", queue_name, "--id", "msg-2", "--yes"))

    dlq = f"{queue_name}.dlq"
    assert output == (
        f"replayed 2 of 6 messages from {dlq} (4 skipped: message id is not 'msg-2'); "
        f"4 remain in {dlq}\n"
    )
    assert bodies(admin.drain(queue_name)) == [b"m2", b"m2 again"]
    assert bodies(admin.drain(dlq)) == [b"m0", b"m1", b"m3", b"m4"]


def test_replay_by_an_id_that_is_not_there_moves_nothing_and_exits_1(
    admin: Admin, queue_name: str
) -> None:
    fill_dlq(admin, queue_name, [Letter(b"a"), Letter(b"b")])

    result = steadyrabbit("dlq", "replay", queue_name, "--id", "nope", "--yes")

    assert result.status == 1, result
    assert result.stdout.startswith(f"replayed 0 of 2 messages from {queue_name}.dlq")
    assert bodies(admin.drain(f"{queue_name}.dlq")) == [b"a", b"b"]
    assert admin.counts(queue_name) == (0, 0)


async def test_replay_with_an_id_and_an_error_filter_needs_both(
    admin: Admin, queue_name: str, make_settings: MakeSettings
) -> None:
    letters = [Letter(b"0", "KeyError", "KeyError: x"), Letter(b"1", "ValueError", "bad")]
    fill_dlq(admin, queue_name, letters)

    result = await replay_dead_letters(
        make_settings(), queue_name, message_id="msg-1", error_filter="keyerror"
    )

    assert (result.replayed, result.skipped) == (0, 2)
    assert bodies(admin.drain(f"{queue_name}.dlq")) == [b"0", b"1"]


async def test_replay_to_a_queue_that_refuses_it_keeps_the_message(
    admin: Admin, queue_name: str, make_settings: MakeSettings
) -> None:
    admin.declare(queue_name, {"x-max-length": 1, "x-overflow": "reject-publish"})
    admin.publish(queue_name, [b"full"])
    admin.declare(f"{queue_name}.dlq")
    for index, body in enumerate([b"first", b"second"]):
        props = dead_letter_properties(queue_name, index, Letter(body))
        admin.publish(f"{queue_name}.dlq", [body], properties=props)

    with pytest.raises(PublishRefusedError, match=r"cannot replay to queue .*: the broker refused"):
        await replay_dead_letters(make_settings(), queue_name)

    assert bodies(admin.drain(f"{queue_name}.dlq")) == [b"first", b"second"]
    assert bodies(admin.drain(queue_name)) == [b"full"]


async def test_replay_with_a_filter_and_a_limit(
    admin: Admin, queue_name: str, make_settings: MakeSettings
) -> None:
    kinds = ["KeyError", "ValueError"] * 4
    letters = [Letter(f"{i}".encode(), kind, f"{kind}: boom") for i, kind in enumerate(kinds)]
    fill_dlq(admin, queue_name, letters)

    result = await replay_dead_letters(
        make_settings(), queue_name, limit=2, error_filter="valueerror"
    )

    assert (result.replayed, result.skipped, result.remaining) == (2, 2, 6)
    assert bodies(admin.drain(queue_name)) == [b"1", b"3"]
    assert bodies(admin.drain(f"{queue_name}.dlq")) == [b"0", b"2", b"4", b"5", b"6", b"7"]


async def test_messages_dead_lettered_during_a_replay_are_not_replayed(
    admin: Admin, queue_name: str, make_settings: MakeSettings
) -> None:
    fill_dlq(admin, queue_name, [Letter(f"old {i}".encode()) for i in range(5)])

    def fail_again(done: int, _total: int) -> None:
        if done == 1:  # blocking, briefly: as if a worker dead-lettered these meanwhile
            admin.publish(f"{queue_name}.dlq", [b"new 1", b"new 2"])

    result = await replay_dead_letters(make_settings(), queue_name, progress=fail_again)

    assert (result.total, result.replayed, result.remaining) == (5, 5, 0)
    assert bodies(admin.drain(queue_name)) == [f"old {i}".encode() for i in range(5)]
    assert bodies(admin.drain(f"{queue_name}.dlq")) == [b"new 1", b"new 2"]


async def test_a_stop_event_finishes_the_message_in_hand(
    admin: Admin, queue_name: str, make_settings: MakeSettings
) -> None:
    fill_dlq(admin, queue_name, [Letter(f"{i}".encode()) for i in range(10)])
    stop = asyncio.Event()

    def stop_at_three(done: int, _total: int) -> None:
        if done == 3:
            stop.set()

    result = await replay_dead_letters(
        make_settings(), queue_name, progress=stop_at_three, stop=stop
    )

    assert result.stopped
    assert (result.replayed, result.remaining) == (3, 7)
    assert bodies(admin.drain(queue_name)) == [b"0", b"1", b"2"]
    assert bodies(admin.drain(f"{queue_name}.dlq")) == [f"{i}".encode() for i in range(3, 10)]


async def test_replay_to_a_queue_that_is_gone_keeps_the_message(
    admin: Admin, queue_name: str, make_settings: MakeSettings
) -> None:
    fill_dlq(admin, queue_name, [Letter(b"first"), Letter(b"second")])
    admin.delete(queue_name)  # the original queue is gone; its .dlq stays

    with pytest.raises(ConfigurationError, match=r"cannot replay to queue .* does not exist"):
        await replay_dead_letters(make_settings(), queue_name)

    assert bodies(admin.drain(f"{queue_name}.dlq")) == [b"first", b"second"]


@pytest.fixture
def big_dlq(admin: Admin, queue_name: str) -> list[bytes]:
    expected = [f"message {i:04d}".encode() for i in range(2000)]
    admin.declare(queue_name)
    admin.declare(f"{queue_name}.dlq")
    props = dead_letter_properties(queue_name, 0, Letter(b""))
    admin.publish(f"{queue_name}.dlq", expected, properties=props)
    return expected


@pytest.mark.parametrize(
    ("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["INT", "TERM"]
)
@pytest.mark.slow  # waits out broker timeouts or processes: CI's slow pass
def test_an_interrupted_replay_exits_non_zero_then_another_brings_every_message_back_once(
    admin: Admin,
    queue_name: str,
    big_dlq: list[bytes],
    tmp_path: Path,
    signum: signal.Signals,
    status: int,
) -> None:
    """Issue 8: an interrupted replay exited 0, as if it were complete. Now it finishes the
    message in hand and exits 128 + the signal's number."""
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "steadyrabbit",
                "dlq",
                "replay",
                queue_name,
                "--yes",
                "--url",
                MAIN_URL,
            ],
            cwd=ROOT,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        # The progress bar's label is all it writes when stderr is not a terminal; the queue
        # filling up shows the progress.
        deadline = time.monotonic() + 15
        while not ("replaying" in err.read_text() and admin.counts(queue_name)[0] >= 50):
            if proc.poll() is not None:
                raise AssertionError(f"replay exited early:\n{err.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no progress within 15 s:\n{err.read_text()}")
            time.sleep(0.02)
        proc.send_signal(signum)
        exit_status = proc.wait(15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    stdout_text, stderr_text = out.read_text(), err.read_text()
    assert exit_status == status, stdout_text + stderr_text
    assert "Traceback" not in stderr_text, stderr_text
    assert "stopping after the message in hand" in stderr_text
    first, _, rest = stdout_text.removeprefix("stopped by a signal: replayed ").partition(" ")
    assert stdout_text.startswith("stopped by a signal: replayed "), stdout_text
    replayed = int(first)
    remaining = 2000 - replayed
    assert 0 < replayed < 2000
    assert rest.endswith(f"; {remaining} remain in {queue_name}.dlq\n"), stdout_text
    assert admin.counts(queue_name)[0] == replayed
    assert admin.counts(f"{queue_name}.dlq")[0] == remaining

    again = succeeded(steadyrabbit("dlq", "replay", queue_name, "--yes"))
    assert again.startswith(f"replayed {remaining} of {remaining} messages"), again

    back = bodies(admin.drain(queue_name))
    assert Counter(back) == Counter(big_dlq)
    assert len(back) == 2000
    assert admin.counts(f"{queue_name}.dlq") == (0, 0)


# -- purge -------------------------------------------------------------------------------------


def test_purge_with_yes(admin: Admin, queue_name: str) -> None:
    fill_dlq(admin, queue_name, [Letter(b"1"), Letter(b"2"), Letter(b"3")])
    admin.publish(queue_name, [b"live"])

    output = succeeded(steadyrabbit("dlq", "purge", queue_name, "--yes"))

    assert output == f"purged 3 messages from {queue_name}.dlq\n"
    assert admin.counts(f"{queue_name}.dlq") == (0, 0)
    assert bodies(admin.drain(queue_name)) == [b"live"]


def test_purge_without_yes_and_without_a_terminal_refuses(admin: Admin, queue_name: str) -> None:
    fill_dlq(admin, queue_name, [Letter(b"1"), Letter(b"2")])

    message = one_error_line(steadyrabbit("dlq", "purge", queue_name), EXIT_USAGE)

    assert message == f"refusing to purge {queue_name}.dlq without --yes"
    assert admin.counts(f"{queue_name}.dlq") == (2, 0)


async def test_purge_from_code(admin: Admin, queue_name: str, make_settings: MakeSettings) -> None:
    fill_dlq(admin, queue_name, [Letter(b"1"), Letter(b"2")])
    assert await purge_dead_letters(make_settings(), queue_name) == 2
    assert await purge_dead_letters(make_settings(), queue_name) == 0


# -- a queue without a dead-letter queue -------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [["list"], ["list", "--json"], ["show", "1"], ["replay", "--yes"], ["purge", "--yes"]],
    ids=["list", "list-json", "show", "replay", "purge"],
)
def test_a_missing_dead_letter_queue_is_one_clear_line(
    admin: Admin, queue_name: str, command: list[str]
) -> None:
    admin.declare(queue_name)  # the queue exists, its .dlq does not
    verb, *options = command

    message = one_error_line(steadyrabbit("dlq", verb, queue_name, *options), EXIT_USAGE)

    assert message == f"queue {queue_name!r} has no dead-letter queue {queue_name}.dlq"


async def test_a_missing_dead_letter_queue_from_code(
    queue_name: str, make_settings: MakeSettings
) -> None:
    for call in (list_dead_letters, replay_dead_letters, purge_dead_letters):
        with pytest.raises(ConfigurationError, match="has no dead-letter queue"):
            await call(make_settings(), queue_name)
    with pytest.raises(ConfigurationError, match="has no dead-letter queue"):
        await show_dead_letter(make_settings(), queue_name, 1)


def test_dlq_help() -> None:
    output = succeeded(steadyrabbit("dlq", "--help", url=False))
    assert all(command in output for command in ("list", "show", "replay", "purge"))
