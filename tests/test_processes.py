"""`steadyrabbit run/relay --processes N`: one supervisor, N worker processes, end to end.

Real broker, real processes, no mocks. A supervisor's workers are found through /proc (the
live children of its pid), so these tests need Linux. The restart policy, the escalation of a
stop and the parent-death modes are also tested on
:func:`steadyrabbit._ops.processes.run_worker_pool` itself, run as a small script
(SUPERVISOR_SCRIPT) over throwaway ``python -c`` workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pika.exceptions
import pytest

from tests.conftest import MAIN_URL, Admin, eventually
from tests.test_cli import LOG_RECORD, PASSWORD, assert_error, steadyrabbit

# Each test starts worker processes and waits on them: the file takes over a minute, more than
# the everyday pass can spare; the slow pass (CI) runs it.
pytestmark = [
    pytest.mark.anyio,
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds workers in /proc"),
]

ROOT = Path(__file__).resolve().parent.parent
ERROR_PREFIX = "steadyrabbit: error: "
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# Runs run_worker_pool() from code: argv[1] is a JSON object of keyword arguments, the rest the
# workers' command line.
SUPERVISOR_SCRIPT = """
import json, logging, sys
from steadyrabbit._ops.processes import run_worker_pool
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
options = json.loads(sys.argv[1])
sys.exit(run_worker_pool(sys.argv[2:], **options))
"""


def _env(**extra: str) -> dict[str, str]:
    prefixes = ("STEADYRABBIT_", "SAMPLE_", "SLOW_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(extra)
    return env


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name in parentheses may hold spaces
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by whoever inherited it, is not)."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def children(pid: int) -> set[int]:
    """The live child processes of ``pid``."""
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[1] == pid and stat[0] not in ("Z", "X"):
                found.add(int(entry))
    return found


def cmdline(pid: int) -> list[str]:
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    return []


class Supervisor:
    """A supervisor process; its stdout and stderr go to ``log``. Leaves nothing behind."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.log_path = log
        self.seen_workers: set[int] = set()
        with log.open("wb") as log_file:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def workers(self) -> set[int]:
        if self.proc.poll() is not None:
            raise AssertionError(f"the supervisor exited ({self.proc.returncode}):\n{self.log()}")
        found = children(self.pid)
        self.seen_workers |= found
        return found

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    async def wait(self, within: float) -> tuple[int, float]:
        """Wait for the exit; return (status, seconds waited)."""
        started = time.monotonic()
        try:
            status = await asyncio.to_thread(self.proc.wait, within)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {within} s:\n{self.log()}") from None
        return status, time.monotonic() - started

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.seen_workers |= children(self.pid)
            self.proc.kill()
        self.proc.wait(10)
        for pid in self.seen_workers:
            with contextlib.suppress(ProcessLookupError):
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def queue_name(request: pytest.FixtureRequest) -> Iterator[str]:
    """Like conftest's, but not named ``sr-test-*``: the end of any test session sweeps those
    off the broker, and another session may end while these tests run."""
    name = f"sr-processes-{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
    yield name
    with contextlib.suppress(pika.exceptions.AMQPError):
        Admin(MAIN_URL).delete(name, f"{name}.dlq")


@pytest.fixture
def supervisors() -> Iterator[list[Supervisor]]:
    started: list[Supervisor] = []
    yield started
    for supervisor in started:
        supervisor.cleanup()


def start_cli(
    supervisors: list[Supervisor], tmp_path: Path, *args: str, **env: str
) -> Supervisor:
    """``python -m steadyrabbit ARGS`` against the main broker."""
    argv = [sys.executable, "-m", "steadyrabbit", *args]
    env.setdefault("STEADYRABBIT_STATE_DIR", str(tmp_path / "state"))
    supervisor = Supervisor(argv, tmp_path / f"supervisor-{len(supervisors)}.log", _env(**env))
    supervisors.append(supervisor)
    return supervisor


def start_script(
    supervisors: list[Supervisor], tmp_path: Path, worker: list[str], **options: Any
) -> Supervisor:
    """SUPERVISOR_SCRIPT: ``run_worker_pool(worker, **options)``."""
    argv = [sys.executable, "-c", SUPERVISOR_SCRIPT, json.dumps(options), *worker]
    env = _env(STEADYRABBIT_STATE_DIR=str(tmp_path / "state"))
    supervisor = Supervisor(argv, tmp_path / f"supervisor-{len(supervisors)}.log", env)
    supervisors.append(supervisor)
    return supervisor


async def two_workers_consuming(supervisor: Supervisor, admin: Admin, queue: str) -> set[int]:
    """Wait until the queue has 2 consumers and the supervisor 2 workers; return their pids."""

    def ready() -> bool:
        return len(supervisor.workers()) == 2 and admin.counts(queue)[1] == 2

    await eventually(ready, within=30, what="2 workers consuming")
    return supervisor.workers()


def out_lines(path: Path) -> list[str]:
    """The complete lines written so far (a line being written is left out)."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return text.splitlines()[: text.count("\n")]


def slow_events(path: Path) -> list[tuple[str, str, int]]:
    """tests/slow_app.py's output as (event, body, pid)."""
    events = []
    for line in out_lines(path):
        event, body, pid = line.split(" ")
        events.append((event, body, int(pid)))
    return events


def in_flight(path: Path) -> dict[int, str]:
    """pid -> body of the message a worker started and has not finished."""
    running: dict[int, str] = {}
    for event, body, pid in slow_events(path):
        if event == "start":
            running[pid] = body
        elif running.get(pid) == body:
            del running[pid]
    return running


# -- the option ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "relay"])
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", "--processes: input should be greater than or equal to 1"),
        ("-2", "--processes: input should be greater than or equal to 1"),
        ("two", "Invalid value for '--processes'"),
    ],
)
def test_processes_must_be_a_positive_number(command: str, value: str, expected: str) -> None:
    args = ["run", "tests.sample_app:app"] if command == "run" else ["relay", "q", "http://x"]
    result = steadyrabbit(*args, "--processes", value, "--url", MAIN_URL)
    message = assert_error(result, EXIT_USAGE)
    assert expected in message
    assert f"see 'steadyrabbit {command} --help'" in message


@pytest.mark.parametrize("command", ["run", "relay"])
def test_help_mentions_processes(command: str) -> None:
    result = steadyrabbit(command, "--help")
    assert result.status == 0, result.stderr
    assert "--processes N" in result.stdout


def test_malformed_url_is_reported_once_before_any_worker_starts() -> None:
    url = f"http://guest:{PASSWORD}@localhost/"
    result = steadyrabbit("run", "tests.sample_app:app", "--processes", "3", "--url", url)
    message = assert_error(result, EXIT_USAGE)  # exactly one line: no worker was started
    assert "malformed broker URL" in message


def test_an_option_value_spelled_like_the_option_is_refused() -> None:
    args = ["relay", "q", "http://x", "--exchange", "e", "--routing-key", "--processes"]
    message = assert_error(steadyrabbit(*args, "--processes", "2"), EXIT_USAGE)
    assert "workers' command line" in message


# -- running ---------------------------------------------------------------------------------


async def test_two_workers_share_the_queue_and_stop_on_sigterm(
    admin: Admin, queue_name: str, tmp_path: Path, supervisors: list[Supervisor]
) -> None:
    out = tmp_path / "out.txt"
    admin.declare(queue_name)
    supervisor = start_cli(
        supervisors,
        tmp_path,
        *("run", "tests.sample_app:app", "--processes", "2", "--url", MAIN_URL),
        SAMPLE_QUEUE=queue_name,
        SAMPLE_OUT=str(out),
    )
    workers = await two_workers_consuming(supervisor, admin, queue_name)
    assert len(workers) == 2
    assert supervisor.pid not in workers
    for pid in workers:  # each one the same command, with --processes 1
        assert cmdline(pid)[1:] == [
            "-m", "steadyrabbit", "run", "tests.sample_app:app", "--url", MAIN_URL,
            "--processes", "1",
        ]

    bodies = [f"message {n}" for n in range(40)]
    await admin.run(admin.publish, queue_name, [b.encode() for b in bodies])
    await eventually(lambda: len(out_lines(out)) >= len(bodies), within=30, what="40 lines")

    supervisor.signal(signal.SIGTERM)
    status, seconds = await supervisor.wait(15)
    log = supervisor.log()
    assert status == EXIT_OK, log
    assert seconds < 5, log
    assert "Traceback" not in log, log
    assert sorted(out_lines(out)) == sorted(bodies)  # every message exactly once
    assert not any(alive(pid) for pid in workers)
    assert admin.counts(queue_name) == (0, 0)


async def test_relay_with_two_workers(
    admin: Admin, queue_name: str, tmp_path: Path, supervisors: list[Supervisor]
) -> None:
    admin.declare(queue_name)
    supervisor = start_cli(
        supervisors,
        tmp_path,
        *("relay", queue_name, "http://127.0.0.1:1/", "--processes=2", "--url", MAIN_URL),
    )
    workers = await two_workers_consuming(supervisor, admin, queue_name)
    for pid in workers:
        assert "--processes=2" not in cmdline(pid)
    supervisor.signal(signal.SIGINT)  # as a Ctrl-C in a terminal would
    status, _ = await supervisor.wait(15)
    assert status == EXIT_OK, supervisor.log()
    assert not any(alive(pid) for pid in workers)


def free_port_pair() -> int:
    """A port P with P + 1 free too (both bound at once, then released)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise AssertionError("no two adjacent free ports")


async def test_each_worker_serves_metrics_on_its_own_port(
    admin: Admin, queue_name: str, tmp_path: Path, supervisors: list[Supervisor]
) -> None:
    admin.declare(queue_name)
    port = free_port_pair()
    supervisor = start_cli(
        supervisors,
        tmp_path,
        *("relay", queue_name, "http://127.0.0.1:1/", "--processes", "2", "--url", MAIN_URL),
        STEADYRABBIT_METRICS_PORT=str(port),  # from the environment, as the workers inherit it
    )
    workers = await two_workers_consuming(supervisor, admin, queue_name)

    def status(at: int) -> dict[str, Any] | None:
        try:
            response = httpx.get(f"http://127.0.0.1:{at}/status.json", timeout=5)
        except httpx.TransportError:
            return None
        document: dict[str, Any] = response.json()
        return document if document["ready"] else None

    documents: dict[int, dict[str, Any]] = {}

    def both_ready() -> bool:
        for at in (port, port + 1):
            found = status(at)
            if found is not None:
                documents[at] = found
        return len(documents) == 2

    await eventually(lambda: asyncio.to_thread(both_ready), within=30, what="2 endpoints")
    assert {document["worker"]["pid"] for document in documents.values()} == workers
    supervisor.signal(signal.SIGTERM)
    status_code, _ = await supervisor.wait(15)
    assert status_code == EXIT_OK, supervisor.log()


def test_metrics_ports_past_65535_are_refused() -> None:
    result = steadyrabbit(
        "relay", "q", "http://127.0.0.1:1/", "--processes", "3", "--metrics-port", "65534"
    )
    message = assert_error(result, EXIT_USAGE)
    assert message == "--metrics-port 65534 with --processes 3 needs ports up to 65536, past 65535"


async def test_a_killed_worker_is_restarted_and_its_message_redelivered(
    admin: Admin, queue_name: str, tmp_path: Path, supervisors: list[Supervisor]
) -> None:
    out = tmp_path / "out.txt"
    admin.declare(queue_name)
    supervisor = start_cli(
        supervisors,
        tmp_path,
        *("run", "tests.slow_app:app", "--processes", "2", "--url", MAIN_URL),
        SLOW_QUEUE=queue_name,
        SLOW_OUT=str(out),
        SLOW_SECONDS="1",
    )
    workers = await two_workers_consuming(supervisor, admin, queue_name)
    bodies = [f"m{n}" for n in range(10)]
    await admin.run(admin.publish, queue_name, [b.encode() for b in bodies])

    await eventually(lambda: bool(in_flight(out)), within=20, what="a message in flight")
    victim, lost_body = next(iter(in_flight(out).items()))
    assert victim in workers
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        now = supervisor.workers()
        return len(now) == 2 and victim not in now and admin.counts(queue_name)[1] == 2

    await eventually(replaced, within=20, what="the killed worker replaced")
    successor = (supervisor.workers() - workers).pop()

    def all_done() -> bool:
        return {body for event, body, _ in slow_events(out) if event == "done"} == set(bodies)

    await eventually(all_done, within=60, what="every message done")
    supervisor.signal(signal.SIGTERM)
    status, _ = await supervisor.wait(15)
    log = supervisor.log()
    assert status == EXIT_OK, log
    events = slow_events(out)
    done = Counter(body for event, body, _ in events if event == "done")
    assert done == Counter(bodies), log  # nothing lost, nothing done twice
    assert ("done", lost_body, victim) not in events
    assert f"(pid {victim}) was killed by SIGKILL" in log
    assert "starting it again in" in log
    assert not alive(successor)
    assert admin.counts(queue_name) == (0, 0)


async def test_graceful_stop_finishes_the_work_in_flight_in_every_worker(
    admin: Admin, queue_name: str, tmp_path: Path, supervisors: list[Supervisor]
) -> None:
    out = tmp_path / "out.txt"
    admin.declare(queue_name)
    supervisor = start_cli(
        supervisors,
        tmp_path,
        *("run", "tests.slow_app:app", "--processes", "2", "--url", MAIN_URL),
        SLOW_QUEUE=queue_name,
        SLOW_OUT=str(out),
        SLOW_SECONDS="3",
    )
    workers = await two_workers_consuming(supervisor, admin, queue_name)
    bodies = [f"m{n}" for n in range(6)]
    await admin.run(admin.publish, queue_name, [b.encode() for b in bodies])
    await eventually(lambda: len(in_flight(out)) == 2, within=20, what="2 workers busy")

    supervisor.signal(signal.SIGTERM)
    status, seconds = await supervisor.wait(30)
    log = supervisor.log()
    assert status == EXIT_OK, log
    assert seconds < 10, log
    assert not any(alive(pid) for pid in workers)
    events = slow_events(out)
    started = Counter(body for event, body, _ in events if event == "start")
    done = Counter(body for event, body, _ in events if event == "done")
    assert started == done, log  # every handler that started finished
    assert set(started.values()) == {1}, log  # once
    assert {pid for _, _, pid in events} == workers  # both workers had work in flight
    left = [body.decode() for _, body in await admin.run(admin.drain, queue_name)]
    assert sorted([*done, *left]) == sorted(bodies)  # the rest went back to the queue


async def test_a_second_signal_stops_the_workers_at_once(
    admin: Admin, queue_name: str, tmp_path: Path, supervisors: list[Supervisor]
) -> None:
    out = tmp_path / "out.txt"
    admin.declare(queue_name)
    supervisor = start_cli(
        supervisors,
        tmp_path,
        *("run", "tests.slow_app:app", "--processes", "2", "--url", MAIN_URL),
        SLOW_QUEUE=queue_name,
        SLOW_OUT=str(out),
        SLOW_SECONDS="60",
    )
    workers = await two_workers_consuming(supervisor, admin, queue_name)
    bodies = [f"m{n}" for n in range(4)]
    await admin.run(admin.publish, queue_name, [b.encode() for b in bodies])
    await eventually(lambda: len(in_flight(out)) == 2, within=20, what="2 workers busy")

    supervisor.signal(signal.SIGTERM)
    # Both workers began their graceful stop (a signal sent before a process handled the
    # previous one of the same kind would merge with it).
    await eventually(
        lambda: supervisor.log().count("steadyrabbit: SIGTERM: stopping gracefully") == 2,
        within=10,
        what="both workers stopping gracefully",
    )
    supervisor.signal(signal.SIGTERM)
    status, seconds = await supervisor.wait(15)
    log = supervisor.log()
    assert status == EXIT_FAILURE, log
    assert seconds < 5, log
    assert "Traceback" not in log, log
    assert not any(alive(pid) for pid in workers)
    assert not [event for event in slow_events(out) if event[0] == "done"]
    # Unacked, so back in the queue.
    await eventually(
        lambda: admin.counts(queue_name) == (4, 0), within=10, what="4 messages back"
    )


# -- workers that cannot start --------------------------------------------------------------


def assert_worker_errors(stderr: str, expected: str) -> None:
    """Log records, and the workers' one-line error (once per worker that got that far)."""
    assert "Traceback" not in stderr, stderr
    assert PASSWORD not in stderr, stderr
    errors = [line for line in stderr.splitlines() if not LOG_RECORD.match(line)]
    assert errors, stderr
    assert len(set(errors)) == 1, stderr
    assert errors[0].startswith(ERROR_PREFIX), stderr
    assert expected in errors[0], stderr
    assert "starting it again" not in stderr, stderr  # no restart


def test_wrong_password_stops_everything_with_the_workers_error() -> None:
    url = f"amqp://guest:{PASSWORD}@127.0.0.1:5672/%2F"
    result = steadyrabbit("run", "tests.sample_app:app", "--processes", "2", "--url", url)
    assert result.status == EXIT_FAILURE, result.stderr
    assert result.seconds < 10, result.stderr
    assert_worker_errors(result.stderr, "refused the login of user 'guest'")
    assert "every worker would fail the same way" in result.stderr


def test_unreachable_broker_stops_everything_with_the_workers_error() -> None:
    url = f"amqp://guest:{PASSWORD}@127.0.0.1:1/%2F"
    args = ["relay", "q", "http://x", "--processes", "2", "--url", url, "--connect-timeout", "2"]
    result = steadyrabbit(*args)
    assert result.status == EXIT_FAILURE, result.stderr
    assert result.seconds < 10, result.stderr
    assert_worker_errors(result.stderr, "no broker answered within 2 s")


def test_an_app_that_cannot_be_loaded_stops_everything_with_status_2() -> None:
    result = steadyrabbit("run", "nosuchmodule:app", "--processes", "3", "--url", MAIN_URL)
    assert result.status == EXIT_USAGE, result.stderr
    assert result.seconds < 10, result.stderr
    assert_worker_errors(result.stderr, "cannot import module 'nosuchmodule'")
    assert "(a configuration error)" in result.stderr


# -- the restart policy and the stop, on run_worker_pool() itself -------------------------


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


async def test_a_worker_that_dies_at_once_is_restarted_with_backoff(
    tmp_path: Path, supervisors: list[Supervisor]
) -> None:
    supervisor = start_script(
        supervisors, tmp_path, python("raise SystemExit(3)"), processes=2, grace_period=1
    )
    await asyncio.sleep(3)  # let it try: a hot loop would start hundreds of workers
    supervisor.signal(signal.SIGTERM)
    status, seconds = await supervisor.wait(10)
    log = supervisor.log()
    # The slots were waiting to start crashed workers again: not a clean stop.
    assert status == EXIT_FAILURE, log
    assert seconds < 2, log
    starts = log.count(" started (pid ")
    # Delays of 0.5-1 s, 1-2 s, ...: at most 3 starts per slot in 3 s.
    assert 4 <= starts <= 6, log
    assert "exited with status 3 after" in log, log


@pytest.mark.parametrize(
    ("code", "window", "expected"),
    [
        pytest.param("import time; time.sleep(0.5); raise SystemExit(1)", 0.2, None, id="1-late"),
        pytest.param("raise SystemExit(1)", 30, EXIT_FAILURE, id="1-early"),
        pytest.param("import time; time.sleep(0.5); raise SystemExit(2)", 0.2, EXIT_USAGE,
                     id="2-late"),
    ],
)
async def test_which_failures_stop_everything(
    tmp_path: Path,
    supervisors: list[Supervisor],
    code: str,
    window: float,
    expected: int | None,
) -> None:
    supervisor = start_script(
        supervisors,
        tmp_path,
        python(code),
        processes=2,
        grace_period=1,
        startup_window=window,
        restart_delay=0.1,
    )
    if expected is None:  # restarted
        await eventually(
            lambda: supervisor.log().count(" started (pid ") >= 4, within=10, what="restarts"
        )
        supervisor.signal(signal.SIGTERM)
        status, _ = await supervisor.wait(10)
        assert "starting it again" in supervisor.log()
    else:
        status, _ = await supervisor.wait(10)
        assert supervisor.log().count(" started (pid ") == 2, supervisor.log()
        assert "every worker would fail the same way" in supervisor.log()
        assert status == expected, supervisor.log()


IGNORE_SIGTERM = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "open(sys.argv[1], 'a').write('x'); time.sleep(60)"
)


@pytest.mark.parametrize("how", ["timer", "third-signal"])
async def test_workers_that_do_not_stop_are_stopped_at_once_then_killed(
    tmp_path: Path, supervisors: list[Supervisor], how: str
) -> None:
    ready = tmp_path / "ready"
    options: dict[str, Any] = {"processes": 2, "grace_period": 0.5}
    if how == "timer":
        options.update(stop_margin=0.5, kill_after=0.5)
    supervisor = start_script(
        supervisors, tmp_path, [*python(IGNORE_SIGTERM), str(ready)], **options
    )
    await eventually(
        lambda: ready.exists() and len(ready.read_text()) == 2, within=10, what="2 workers"
    )
    workers = supervisor.workers()
    supervisor.signal(signal.SIGTERM)
    if how == "third-signal":
        for _ in range(2):
            await asyncio.sleep(0.2)
            supervisor.signal(signal.SIGINT)
    status, seconds = await supervisor.wait(10)
    log = supervisor.log()
    assert status == EXIT_FAILURE, log
    assert seconds < 4, log
    assert log.count("was killed by SIGKILL") == 2, log
    assert not any(alive(pid) for pid in workers)


@pytest.mark.parametrize("mode", ["signal", "pipe"])
async def test_workers_stop_when_the_supervisor_is_killed(
    admin: Admin,
    queue_name: str,
    tmp_path: Path,
    supervisors: list[Supervisor],
    mode: str,
) -> None:
    out = tmp_path / "out.txt"
    worker = [sys.executable, "-m", "steadyrabbit", "run", "tests.sample_app:app"]
    supervisor = start_script(
        supervisors,
        tmp_path,
        [*worker, "--url", MAIN_URL],
        processes=2,
        grace_period=5,
        parent_death=mode,
        env=_env(SAMPLE_QUEUE=queue_name, SAMPLE_OUT=str(out)),
    )
    admin.declare(queue_name)
    workers = await two_workers_consuming(supervisor, admin, queue_name)
    supervisor.signal(signal.SIGKILL)
    await supervisor.wait(10)
    await eventually(
        lambda: not any(alive(pid) for pid in workers), within=15, what="the workers gone"
    )
    assert admin.counts(queue_name) == (0, 0)
    log = supervisor.log()
    assert "stopping gracefully" in log, log  # a SIGTERM, not a kill
    if mode == "pipe":
        assert log.count("the supervisor is gone: stopping") == 2, log
