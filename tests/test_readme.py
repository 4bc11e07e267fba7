"""The README's middleware example, run as it is against the broker."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from steadyrabbit import App, Message, Outcome, Reject, Worker
from tests.conftest import Admin, MakeSettings, eventually

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> dict[str, Any]:
    text = README.read_text()
    match = re.search(r"<!-- README example: .*? -->\n```python\n(.*?)```", text, re.DOTALL)
    assert match is not None, "the README's middleware example is gone"
    namespace: dict[str, Any] = {}
    exec(compile(match.group(1), "README.md", "exec"), namespace)
    return namespace


@pytest.mark.anyio
async def test_the_readme_middleware_sees_every_messages_decision(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    example = readme_example()
    app: App = example["app"]
    audit = example["audit"]
    admin.declare(queue_name)

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        if message.body == b"bad":
            raise Reject("bad")

    async with Worker(app, make_settings()):
        await admin.run(admin.publish, queue_name, [b"good", b"bad", b"good"])
        await eventually(lambda: len(audit.decisions) == 3, what="three decisions")
    assert sorted(d.outcome.value for d in audit.decisions) == sorted(
        [Outcome.ACK.value, Outcome.ACK.value, Outcome.DEAD_LETTER.value]
    )
