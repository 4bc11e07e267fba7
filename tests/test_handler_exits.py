"""Handlers that never return, or that raise SystemExit, on the real broker.

A sync handler stuck forever must not keep the process alive once the worker has stopped
(after a fatal error, or a second signal): its message stays unacked and comes back. A handler
that calls ``sys.exit()`` fails its message like any other exception; the worker goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pika.exceptions
import pytest

from steadyrabbit import App, Message, RetryPolicy, Worker
from tests.conftest import MAIN_URL, Admin, MakeSettings, eventually

ROOT = Path(__file__).resolve().parent.parent
ERROR_PREFIX = "steadyrabbit: error: "
EXIT_FAILURE = 1
# What the conflicting retry queue makes the worker say (tests/stuck_app.py retries in 5 s).
CONFLICT = "x-message-ttl"

# The embedded form: steadyrabbit.run() in a user's program, which then ends as it likes.
LIBRARY_SCRIPT = """
import logging
import sys
from steadyrabbit import Settings, SteadyRabbitError, run
from tests.stuck_app import app
logging.basicConfig(level=logging.INFO)
settings = Settings(urls=(sys.argv[1],), connect_timeout=10, grace_period=60)
try:
    graceful = run(app, settings)
except SteadyRabbitError as exc:
    print(f"{ERROR_PREFIX}{exc}", file=sys.stderr)
    sys.exit(1)
sys.exit(0 if graceful else 1)
""".replace("{ERROR_PREFIX}", ERROR_PREFIX)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEADYRABBIT_", "STUCK_"))}
    env.update(extra)
    return env


class Process:
    """A worker process; its stdout and stderr go to ``log``. Killed if still running at the
    end of the test."""

    def __init__(self, argv: list[str], log: Path, **env: str) -> None:
        self.log_path = log
        with log.open("wb") as log_file:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=_env(**env),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def running(self) -> bool:
        return self.proc.poll() is None

    async def wait(self, within: float) -> tuple[int | None, float]:
        """The exit status (None if still running after ``within`` seconds) and the seconds
        taken."""
        started = time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(self.proc.wait, within)
        return self.proc.poll(), time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.kill()


def start_stuck_app(
    processes: list[Process], form: str, queue: str, out: Path, tmp_path: Path
) -> Process:
    """tests/stuck_app.py with a grace period of 60 s, run by ``steadyrabbit run`` (form
    "cli") or by ``steadyrabbit.run()`` in a program of its own ("library")."""
    if form == "cli":
        argv = [sys.executable, "-m", "steadyrabbit", "run", "tests.stuck_app:app"]
        argv += ["--url", MAIN_URL, "--grace-period", "60"]
    else:
        argv = [sys.executable, "-c", LIBRARY_SCRIPT, MAIN_URL]
    process = Process(
        argv,
        tmp_path / "run.log",
        STUCK_QUEUE=queue,
        STUCK_OUT=str(out),
        STEADYRABBIT_STATE_DIR=str(tmp_path / "state"),
    )
    processes.append(process)
    return process


def stuck_lines(out: Path) -> list[str]:
    text = out.read_text(encoding="utf-8") if out.exists() else ""
    return text.splitlines()[: text.count("\n")]


async def get_stuck(admin: Admin, queue: str, process: Process, out: Path, body: str) -> None:
    """Once both consumers of tests/stuck_app.py consume (a signal before the worker started
    would stop its start instead), publish ``body`` to ``queue``; return once its handler is
    stuck on it."""

    def consuming() -> bool:
        if not process.running():
            raise AssertionError(f"the worker exited early:\n{process.output()}")
        output = process.output()
        return all(f"consuming {name!r}" in output for name in (queue, f"{queue}-other"))

    await eventually(consuming, within=20, what="both consumers consuming")
    await admin.run(admin.publish, queue, [body.encode()])

    def stuck() -> bool:
        if not process.running():
            raise AssertionError(f"the worker exited early:\n{process.output()}")
        return f"stuck {body}" in stuck_lines(out)

    await eventually(stuck, within=20, what=f"the handler to be stuck on {body!r}")


async def back_in_queue(admin: Admin, queue: str) -> None:
    """The stuck handler's message, never acked, is ready in its queue again."""
    await eventually(
        lambda: admin.counts(queue) == (1, 0), within=10, what="the message back in its queue"
    )


# -- 5. a stuck sync handler does not keep a stopped worker alive ------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("form", "body"),
    [
        pytest.param("cli", "sleep", id="cli-sleeping"),
        pytest.param("cli", "spin", id="cli-spinning"),
        pytest.param("library", "sleep", id="steadyrabbit.run-sleeping"),
    ],
)
async def test_a_fatal_error_exits_promptly_while_a_sync_handler_is_stuck_forever(
    admin: Admin,
    queue_name: str,
    tmp_path: Path,
    processes: list[Process],
    form: str,
    body: str,
) -> None:
    other = f"{queue_name}-other"
    retry_queue = f"{other}.retry.5000ms"
    out = tmp_path / "out.txt"
    admin.declare(queue_name)
    admin.declare(other)
    # A permanent error the other consumer meets while the stuck handler runs: its retry
    # queue exists with another TTL.
    admin.declare(retry_queue, arguments={"x-message-ttl": 1234})
    try:
        process = start_stuck_app(processes, form, queue_name, out, tmp_path)
        await get_stuck(admin, queue_name, process, out, body)

        await admin.run(admin.publish, other, [b"retry me"])
        status, seconds = await process.wait(15)
        output = process.output()
        assert status == EXIT_FAILURE, output
        assert seconds < 10, output
        assert "Traceback" not in output, output
        error = output.splitlines()[-1]
        assert error.startswith(ERROR_PREFIX), output
        assert retry_queue in error, output
        assert CONFLICT in error, output
        await back_in_queue(admin, queue_name)
        assert admin.counts(other) == (1, 0)  # not copied anywhere: back too
    finally:
        with contextlib.suppress(pika.exceptions.AMQPError):
            admin.delete(other, f"{other}.dlq", retry_queue)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("form", "signum"),
    [
        pytest.param("cli", signal.SIGTERM, id="cli-SIGTERM"),
        pytest.param("cli", signal.SIGINT, id="cli-SIGINT"),
        pytest.param("library", signal.SIGTERM, id="steadyrabbit.run-SIGTERM"),
    ],
)
async def test_a_second_signal_exits_at_once_while_a_sync_handler_is_stuck_forever(
    admin: Admin,
    queue_name: str,
    tmp_path: Path,
    processes: list[Process],
    form: str,
    signum: signal.Signals,
) -> None:
    other = f"{queue_name}-other"
    out = tmp_path / "out.txt"
    admin.declare(queue_name)
    try:
        process = start_stuck_app(processes, form, queue_name, out, tmp_path)
        await get_stuck(admin, queue_name, process, out, "sleep")

        process.proc.send_signal(signum)
        # The first signal must be handled before the second is sent (signals can coalesce).
        await eventually(
            lambda: "stopping gracefully" in process.output() or not process.running(),
            within=10,
            what="the graceful stop to begin",
        )
        assert process.running(), process.output()  # waiting for the stuck handler
        process.proc.send_signal(signum)
        status, seconds = await process.wait(15)
        output = process.output()
        assert status == EXIT_FAILURE, output
        assert seconds < 5, output
        assert "Traceback" not in output, output
        assert "stopping now" in output, output
        await back_in_queue(admin, queue_name)
    finally:
        with contextlib.suppress(pika.exceptions.AMQPError):
            admin.delete(other, f"{other}.dlq")


# -- 6. SystemExit in a handler fails the message, not the worker ------------------------------


def _sync_exit(message: Message) -> None:
    sys.exit(3)


def _sync_interrupt(message: Message) -> None:
    raise KeyboardInterrupt  # in a handler thread, never a real Ctrl-C


async def _async_exit(message: Message) -> None:
    await asyncio.sleep(0)
    raise SystemExit("async bye")


@pytest.mark.parametrize(
    ("fail", "reason", "policy"),  # the reason names what the handler raised
    [
        pytest.param(
            _sync_exit,
            "gave up after 1 attempts: SystemExit: 3",
            RetryPolicy(max_attempts=1),
            id="sync-sys.exit",
        ),
        pytest.param(
            _sync_interrupt,
            "KeyboardInterrupt",
            RetryPolicy(permanent=(KeyboardInterrupt,)),  # the policy sees the original
            id="sync-KeyboardInterrupt",
        ),
        pytest.param(
            _async_exit,
            "SystemExit: async bye",
            RetryPolicy(permanent=(SystemExit,)),
            id="async-SystemExit",
        ),
    ],
)
@pytest.mark.anyio
async def test_system_exit_in_a_handler_dead_letters_the_message_and_the_worker_goes_on(
    admin: Admin,
    queue_name: str,
    tmp_path: Path,
    fail: Callable[[Message], Any],
    reason: str,
    policy: RetryPolicy,
    make_settings: MakeSettings,
) -> None:
    admin.declare(queue_name)
    handled: list[bytes] = []
    app = App(retry=policy)

    if inspect.iscoroutinefunction(fail):
        async_fail: Callable[[Message], Awaitable[None]] = fail

        @app.consumer(queue_name)
        async def handle_async(message: Message) -> None:
            if message.body == b"exit":
                await async_fail(message)
            handled.append(message.body)

    else:

        @app.consumer(queue_name)
        def handle(message: Message) -> None:
            if message.body == b"exit":
                fail(message)
            handled.append(message.body)

    async with Worker(app, make_settings()) as worker:
        failed = asyncio.ensure_future(worker.wait_failed())
        await admin.run(admin.publish, queue_name, [b"exit", b"after"])
        await eventually(
            lambda: handled == [b"after"] and worker.stats.dead_lettered == 1,
            within=10,
            what="the dead letter and the next message handled",
        )
        assert not failed.done()
        failed.cancel()
    assert worker.stats.handler_errors == 1
    assert admin.counts(queue_name) == (0, 0)
    [(props, body)] = admin.drain(f"{queue_name}.dlq")
    headers = props.headers or {}
    assert body == b"exit"
    assert headers["x-steadyrabbit-reason"] == reason
    raised = reason.removeprefix("gave up after 1 attempts: ").split(":")[0]
    assert headers["x-steadyrabbit-exception"] == raised  # SystemExit, not HandlerExit
