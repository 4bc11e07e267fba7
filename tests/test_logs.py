"""Logs a machine can read: JSON lines with an ISO-8601 time and a message's facts as fields;
the plain format one line per event, a failed attempt's traceback only at debug level."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pika
import pytest

from steadyrabbit import App, Message, RetryPolicy, Worker
from steadyrabbit._cli.logs import configure_logging
from tests.conftest import Admin, MakeSettings, Settled

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quieted = {name: logging.getLogger(name).level for name in ("pika", "httpx", "httpcore")}
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, quiet in quieted.items():
            logging.getLogger(name).setLevel(quiet)


async def fail_twice(
    queue_name: str, admin: Admin, make_settings: MakeSettings, level: str, log_format: str
) -> None:
    admin.declare(queue_name)
    settled = Settled()
    app = App(middleware=[settled], retry=RetryPolicy(max_attempts=2, delays=(0.05,)))

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        raise ValueError("backend said no\nsecond line https://u:Pa55w0rd@api.example/x")

    configure_logging(level, log_format)
    try:
        async with Worker(app, make_settings()):
            await admin.run(
                admin.publish,
                queue_name,
                [b"x"],
                properties=pika.BasicProperties(message_id="m-1", delivery_mode=2),
            )
            await settled.wait_for(2)
    finally:
        admin.delete(f"{queue_name}.retry.50ms")


@pytest.mark.anyio
@pytest.mark.usefixtures("restore_logging")
async def test_json_logs_carry_an_iso_time_and_the_messages_facts_as_fields(
    queue_name: str, admin: Admin, make_settings: MakeSettings, capfd: pytest.CaptureFixture[str]
) -> None:
    await fail_twice(queue_name, admin, make_settings, "info", "json")
    entries = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line]
    ours = [e for e in entries if e.get("queue") == queue_name]
    assert [e["message"] for e in ours] == [
        "handler failed", "retrying", "handler failed", "dead-lettered"
    ]  # fmt: skip
    for entry in ours:
        assert datetime.fromisoformat(entry["time"]).utcoffset() is not None
        assert entry["message_id"] == "m-1"
        assert "error" not in entry  # no traceback at info level
    first, retry, second, dead = ours
    assert (first["attempt"], first["error_type"], first["level"]) == (1, "ValueError", "warning")
    assert isinstance(first["duration"], float)
    assert (retry["attempt"], retry["outcome"], retry["target"]) == (
        1, "retry", f"{queue_name}.retry.50ms"
    )  # fmt: skip
    assert (second["attempt"], dead["attempt"], dead["outcome"]) == (2, 2, "dead_letter")
    assert dead["error_type"] == "ValueError"
    assert dead["reason"].startswith("gave up after 2 attempts: ValueError: backend said no")
    assert "Pa55w0rd" not in json.dumps(entries)
    # The README's sample line has the same keys, in the same order, as a real one.
    readme = README.read_text()
    match = re.search(r"<!-- README example logs: .*? -->\n```json\n(.*?)\n```", readme)
    assert match is not None
    assert list(json.loads(match.group(1))) == list(first)


@pytest.mark.anyio
@pytest.mark.slow
@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("level", ["info", "debug"])
async def test_a_failed_attempt_is_one_plain_line_and_its_traceback_is_debug(
    queue_name: str,
    admin: Admin,
    make_settings: MakeSettings,
    capfd: pytest.CaptureFixture[str],
    level: str,
) -> None:
    await fail_twice(queue_name, admin, make_settings, level, "plain")
    err = capfd.readouterr().err
    failures = [line for line in err.splitlines() if "failed on <Message" in line]
    assert len(failures) == 2
    assert "(attempt 1, " in failures[0]
    assert failures[0].endswith("ValueError: backend said no second line https://u:****@api.example/x")
    assert ("Traceback" in err) is (level == "debug")
    assert "Pa55w0rd" not in err
