"""The command line as a user meets it: `python -m steadyrabbit ...` in a subprocess.

Every error must end as exactly one line ``steadyrabbit: error: ...`` on stderr, with exit
status 2 for usage and configuration errors and 1 for broker problems, no traceback, and never
a password (the URLs here carry a distinctive one).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import MAIN_URL, Admin, eventually

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "hunter2-secret"
ERROR_PREFIX = "steadyrabbit: error: "
EXIT_FAILURE = 1
EXIT_USAGE = 2
# A log record as _cli.logs.configure_logging formats it.
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \d+ (DEBUG|INFO|WARNING|ERROR)\s")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEADYRABBIT_", "SAMPLE_"))}
    env.update(extra)
    return env


@dataclass(frozen=True)
class Result:
    status: int
    stdout: str
    stderr: str
    seconds: float


def steadyrabbit(*args: str, timeout: float = 30, **env: str) -> Result:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "steadyrabbit", *args],
        cwd=ROOT,
        env=_env(**env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Result(done.returncode, done.stdout, done.stderr, time.monotonic() - started)


def assert_error(result: Result, status: int, *, log_records: bool = False) -> str:
    """Check the error contract; return the text after ``steadyrabbit: error:``.

    With ``log_records``, log records (retry warnings) may precede the error line, which must
    then be the last line; otherwise stderr is that one line and nothing else.
    """
    everything = result.stdout + result.stderr
    assert "Traceback" not in everything, everything
    assert PASSWORD not in everything, everything
    assert result.status == status, everything
    assert result.stdout == "", everything
    lines = result.stderr.splitlines()
    assert lines, "nothing on stderr"
    if log_records:
        assert all(LOG_RECORD.match(line) for line in lines[:-1]), result.stderr
    else:
        assert len(lines) == 1, result.stderr
    line = lines[-1]
    assert line.startswith(ERROR_PREFIX), result.stderr
    message = line.removeprefix(ERROR_PREFIX).strip()
    assert message, result.stderr
    return message


# -- usage and configuration errors: exit 2, nothing attempted --------------------------------

BAD_URL = f"amqp://guest:{PASSWORD}@127.0.0.1:1/%2F"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(
            ["relay", "q", "http://x", "--bogus", "--url", BAD_URL],
            "No such option '--bogus'",
            id="unknown-option",
        ),
        pytest.param(["relay", "q"], "Missing argument 'TARGET_URL'", id="relay-missing-target"),
        pytest.param(["relay"], "Missing argument 'QUEUE'", id="relay-missing-queue"),
        pytest.param(["run"], "Missing argument 'MODULE:APP'", id="run-missing-app"),
        pytest.param(["fly", "away"], "No such command 'fly'", id="unknown-command"),
        pytest.param(
            ["relay", "q", "http://x", "--concurrency", "0"],
            "--concurrency: input should be greater than or equal to 1",
            id="concurrency-0",
        ),
        pytest.param(
            ["relay", "q", "http://x", "--connect-timeout", "soon"],
            "Invalid value for '--connect-timeout'",
            id="connect-timeout-not-a-number",
        ),
        pytest.param(
            ["relay", "q", "http://x", "--exchange", "events", "--url", BAD_URL],
            "--exchange needs --routing-key",
            id="exchange-without-routing-key",
        ),
        pytest.param(
            ["relay", "q", "http://x", "--concurrency", "4", "--prefetch", "2"],
            "prefetch must be between the concurrency (4)",
            id="prefetch-below-concurrency",
        ),
        pytest.param(
            ["relay", "q", "http://x", "--prefetch", "0", "--url", BAD_URL],
            "--prefetch: 0 means unlimited prefetch, which a steadyrabbit worker never uses",
            id="relay-prefetch-0",
        ),
        pytest.param(
            ["run", "tests.sample_app:app", "--prefetch", "0", "--url", BAD_URL],
            "--prefetch: 0 means unlimited prefetch, which a steadyrabbit worker never uses",
            id="run-prefetch-0",
        ),
        pytest.param(
            ["run", "tests.window_app:app", "--prefetch", "3", "--url", BAD_URL],
            "--prefetch: queue 'window-own-concurrency': the default prefetch is below its "
            "concurrency (4); give that consumer a prefetch of its own, or raise the default",
            id="run-default-prefetch-below-a-consumers-concurrency",
        ),
        pytest.param(
            ["run", "tests.window_app:app", "--concurrency", "3", "--url", BAD_URL],
            "--concurrency: queue 'window-own-prefetch': the default concurrency is above its "
            "own prefetch (2)",
            id="run-default-concurrency-above-a-consumers-prefetch",
        ),
    ],
)
def test_usage_errors(args: list[str], expected: str) -> None:
    message = assert_error(steadyrabbit(*args), EXIT_USAGE)
    assert expected in message


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param(
            f"http://guest:{PASSWORD}@localhost/", "must be amqp:// or amqps://", id="http-scheme"
        ),
        pytest.param(
            f"amqp://guest:{PASSWORD}@localhost:notaport/",
            "the port must be a number from 1 to 65535",
            id="port-not-a-number",
        ),
        pytest.param(
            f"amqp://guest:{PASSWORD}@localhost:99999/",
            "the port must be a number from 1 to 65535",
            id="port-range",
        ),
        pytest.param(f"amqp://guest:{PASSWORD}@/", "names no host", id="no-host"),
        pytest.param(
            f"amqp://guest:{PASSWORD}@localhost/?heartbaet=5",
            "unknown query parameter 'heartbaet'",
            id="unknown-query",
        ),
        pytest.param(
            f"amqp://guest:guest@localhost/,amqp://guest:{PASSWORD}@:5672/",
            "names no host",
            id="second-of-two",
        ),
    ],
)
def test_malformed_broker_url(url: str, expected: str) -> None:
    message = assert_error(steadyrabbit("relay", "q", "http://x", "--url", url), EXIT_USAGE)
    assert "malformed broker URL" in message
    assert expected in message
    assert "guest:****@" in message  # shown, masked


@pytest.mark.parametrize("separator", ["/", "#", "?"])
def test_malformed_broker_url_with_a_raw_delimiter_in_the_password(separator: str) -> None:
    secret = PASSWORD.replace("-", separator)  # "hunter2/secret": urllib reads "hunter2" as port
    url = f"amqp://guest:{secret}@localhost/"
    result = steadyrabbit("relay", "q", "http://x", "--url", url, "--connect-timeout", "2")
    assert "hunter2" not in result.stdout + result.stderr, result.stderr
    assert result.status == EXIT_USAGE, result.stderr


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("ftp://x", id="ftp"),
        pytest.param("http://", id="no-host"),
        pytest.param("example.com/hook", id="no-scheme"),
    ],
)
def test_bad_relay_target(target: str) -> None:
    message = assert_error(steadyrabbit("relay", "q", target, "--url", BAD_URL), EXIT_USAGE)
    assert "malformed target URL" in message


@pytest.mark.parametrize(
    ("app", "expected"),
    [
        pytest.param(
            "nosuchmodule:app", "cannot import module 'nosuchmodule'", id="no-such-module"
        ),
        pytest.param(
            "tests.sample_app:nosuch",
            "module 'tests.sample_app' has no attribute 'nosuch'",
            id="no-such-attribute",
        ),
        pytest.param(
            "tests.sample_app", "'tests.sample_app' is not of the form MODULE:APP", id="no-colon"
        ),
        pytest.param(":app", "is not of the form MODULE:APP", id="no-module"),
        pytest.param("tests.sample_app:QUEUE", "is a str, not a steadyrabbit App", id="not-an-app"),
    ],
)
def test_bad_module_app(app: str, expected: str) -> None:
    message = assert_error(steadyrabbit("run", app, "--url", BAD_URL), EXIT_USAGE)
    assert expected in message


def test_module_app_naming_a_factory_that_needs_arguments() -> None:
    result = steadyrabbit("run", "tests.sample_app:make_app", "--url", BAD_URL)
    assert_error(result, EXIT_USAGE)


# -- broker problems: exit 1 -------------------------------------------------------------------


def test_wrong_credentials() -> None:
    url = f"amqp://guest:{PASSWORD}@127.0.0.1:5672/%2F"
    result = steadyrabbit("relay", "q", "http://x", "--url", url, "--connect-timeout", "10")
    message = assert_error(result, EXIT_FAILURE)
    assert "'guest'" in message
    assert "password" in message
    assert "guest:****@127.0.0.1:5672" in message


@pytest.mark.parametrize("log_level", [None, "error"])
def test_unreachable_broker(log_level: str | None) -> None:
    args = ["relay", "q", "http://x", "--url", BAD_URL, "--connect-timeout", "2"]
    if log_level is not None:
        args += ["--log-level", log_level]
    result = steadyrabbit(*args, timeout=20)
    # At the default level each failed attempt is logged as a warning before the error line.
    message = assert_error(result, EXIT_FAILURE, log_records=log_level is None)
    assert result.seconds < 10
    assert "no broker answered within 2 s" in message
    assert "guest:****@127.0.0.1:1" in message


# -- help --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--help"], ["Usage: steadyrabbit", "relay", "run"]),
        (["relay", "--help"], ["Usage: steadyrabbit relay", "QUEUE TARGET_URL", "--concurrency"]),
        (["run", "--help"], ["Usage: steadyrabbit run", "MODULE:APP", "--grace-period"]),
    ],
)
def test_help(args: list[str], expected: list[str]) -> None:
    result = steadyrabbit(*args, STEADYRABBIT_URL=BAD_URL)
    assert result.status == 0, result.stderr
    assert result.stderr == ""
    for part in expected:
        assert part in result.stdout
    assert PASSWORD not in result.stdout


# -- run really consumes -------------------------------------------------------------------------


def start_run(app: str, log: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
    """``steadyrabbit run APP [ARGS]`` against the main broker; stdout and stderr go to
    ``log``."""
    with log.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "steadyrabbit", "run", app, "--url", MAIN_URL, *args],
            cwd=ROOT,
            env=_env(**env),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


@pytest.mark.anyio
async def test_run_consumes_and_stops_on_sigterm(
    admin: Admin, queue_name: str, tmp_path: Path
) -> None:
    out = tmp_path / "out.txt"
    log = tmp_path / "run.log"
    bodies = ["first", "second: Größe ✓", "third"]
    admin.declare(queue_name)
    admin.publish(queue_name, [b.encode() for b in bodies])

    def lines() -> list[str]:
        """The complete lines written so far (a line being written is left out)."""
        text = out.read_text(encoding="utf-8") if out.exists() else ""
        return text.splitlines()[: text.count("\n")]

    proc = start_run("tests.sample_app:app", log, SAMPLE_QUEUE=queue_name, SAMPLE_OUT=str(out))
    try:

        def written() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"run exited early:\n{log.read_text()}")
            return len(lines()) >= 3

        await eventually(written, within=20, what="3 lines in the output file")
        proc.send_signal(signal.SIGTERM)
        status = await asyncio.to_thread(proc.wait, 15)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)

    output = log.read_text(encoding="utf-8", errors="replace")
    assert status == 0, output
    assert "Traceback" not in output, output
    assert lines() == bodies
    assert admin.counts(queue_name) == (0, 0)


def test_json_logs_are_one_masked_object_per_line() -> None:
    url = f"amqp://guest:{PASSWORD}@127.0.0.1:1/%2F"
    result = steadyrabbit(
        "relay", "q", "http://x", "--url", url, "--connect-timeout", "2", "--log-format", "json",
        timeout=20,
    )
    assert result.status == EXIT_FAILURE, result.stderr
    *records, error = result.stderr.strip().splitlines()
    assert records, result.stderr
    for line in records:
        entry = json.loads(line)
        assert set(entry) >= {"time", "level", "logger", "pid", "message"}
        assert entry["level"] == "warning"
        assert "guest:****@127.0.0.1:1" in entry["message"]
    assert error.startswith("steadyrabbit: error: no broker answered")
    assert PASSWORD not in result.stderr + result.stdout


@pytest.mark.anyio
async def test_run_gives_the_config_files_concurrency_to_consumers_without_their_own(
    admin: Admin, queue_name: str, tmp_path: Path
) -> None:
    """tests.slow_app's consumer sets no concurrency: `concurrency = 4` in the file runs 4 of
    its 3-second handlers at once, with 4 messages prefetched (prefetch = concurrency) and the
    rest left in the queue. The file's relay setting is named in one warning."""
    out = tmp_path / "out.txt"
    log = tmp_path / "run.log"
    config = tmp_path / "steadyrabbit.toml"
    config.write_text("concurrency = 4\nhttp_timeout = 120\n")
    admin.declare(queue_name)
    admin.publish(queue_name, [f"m{n}".encode() for n in range(7)])

    def lines() -> list[str]:
        text = out.read_text() if out.exists() else ""
        return text.splitlines()[: text.count("\n")]

    proc = start_run(
        "tests.slow_app:app", log, "--config", str(config),
        SLOW_QUEUE=queue_name, SLOW_OUT=str(out), SLOW_SECONDS="3",
    )  # fmt: skip
    try:

        def four_started() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"run exited early:\n{log.read_text()}")
            return len(lines()) >= 4

        await eventually(four_started, within=20, what="4 handlers started")
        first = lines()[:4]
        ready, consumers = admin.counts(queue_name)
        proc.send_signal(signal.SIGTERM)
        status = await asyncio.to_thread(proc.wait, 20)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)

    output = log.read_text(errors="replace")
    assert status == 0, output
    assert [line.split()[0] for line in first] == ["start"] * 4, (first, output)
    assert (ready, consumers) == (3, 1), "4 of 7 prefetched: prefetch = concurrency"
    [warning] = [line for line in output.splitlines() if "does not use" in line]
    assert warning.endswith(
        f"WARNING steadyrabbit: run does not use http_timeout in {config}: relay settings (the "
        "app's code sets its own)"
    ), warning
    done = [line for line in lines() if line.startswith("done")]
    assert len(done) == 4, "the running ones finished on SIGTERM"
    assert admin.counts(queue_name) == (3, 0), "the unstarted ones went back"
