"""Configuration: every setting by flag, STEADYRABBIT_* variable and TOML file, in that order of
precedence, validated into one readable line per problem."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest

from steadyrabbit._cli import cli
from steadyrabbit._config import CONFIG_ENV, Config, env_name, flag, load_config
from steadyrabbit._errors import ConfigurationError
from tests.conftest import MAIN_URL

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "cfg-Pw-4b7e21"

#: A valid value other than the default for every setting: (as TOML, as an environment
#: variable, as the parsed value).
SAMPLES: dict[str, tuple[Any, str, Any]] = {
    "url": (["amqp://a/%2F", "amqp://b/%2F"], "amqp://a/%2F,amqp://b/%2F",
            ("amqp://a/%2F", "amqp://b/%2F")),
    "heartbeat": (7, "7", 7),
    "connect_timeout": (2.5, "2.5", 2.5),
    "log_level": ("debug", "debug", "debug"),
    "log_format": ("json", "json", "json"),
    "grace_period": (0, "0", 0.0),
    "consumer_timeout": (60, "60", 60.0),
    "state_dir": ("/tmp/sr-state", "/tmp/sr-state", Path("/tmp/sr-state")),
    "processes": (3, "3", 3),
    "metrics_port": (9100, "9100", 9100),
    "metrics_host": ("0.0.0.0", "0.0.0.0", "0.0.0.0"),
    "concurrency": (4, "4", 4),
    "prefetch": (8, "8", 8),
    "exchange": ("orders", "orders", "orders"),
    "routing_key": ("order.#", "order.#", "order.#"),
    "http_timeout": (90, "90", 90.0),
    "max_attempts": (2, "2", 2),
    "retry_delay": ([0.5, 30], "0.5,30", (0.5, 30.0)),
    "queue_type": ("quorum", "quorum", "quorum"),
    "alert_smtp_url": ("smtp://mail:25", "smtp://mail:25", "smtp://mail:25"),
    "alert_email_from": ("sr@example.org", "sr@example.org", "sr@example.org"),
    "alert_email_to": (["a@example.org", "b@example.org"], "a@example.org,b@example.org",
                       ("a@example.org", "b@example.org")),
    "alert_webhook_url": ("http://hooks/x", "http://hooks/x", "http://hooks/x"),
    "alert_group_wait": (5, "5", 5.0),
    "alert_repeat_interval": (60, "60", 60.0),
    "alert_reconnect_threshold": (5, "5", 5),
    "alert_reconnect_window": (30, "30", 30.0),
    "alert_stuck_after": (120, "120", 120.0),
    "alert_body_chars": (80, "80", 80),
    "handler_seconds": (75, "75", 75.0),
    "management_url": ("http://mq:15672", "http://mq:15672", "http://mq:15672"),
    "interval": (2, "2", 2.0),
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("STEADYRABBIT_"):
            monkeypatch.delenv(name)


def toml_value(value: Any) -> str:
    return json.dumps(value)  # JSON scalars and arrays of them are valid TOML values


def test_every_setting_has_a_sample() -> None:
    assert set(SAMPLES) == set(Config.model_fields)


def test_every_setting_is_a_flag_of_some_command() -> None:
    flags: set[str] = set()

    def visit(command: click.Command) -> None:
        flags.update(opt for param in command.params for opt in getattr(param, "opts", []))
        if isinstance(command, click.Group):
            for sub in command.commands.values():
                visit(sub)

    visit(cli)
    assert {flag(key) for key in Config.model_fields} <= flags


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_every_setting_from_the_environment(key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _, from_env, expected = SAMPLES[key]
    monkeypatch.setenv(env_name(key), from_env)
    assert getattr(load_config({}), key) == expected


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_every_setting_from_the_file(key: str, tmp_path: Path) -> None:
    in_file, _, expected = SAMPLES[key]
    path = tmp_path / "steadyrabbit.toml"
    path.write_text(f"{key} = {toml_value(in_file)}\n")
    assert getattr(load_config({}, path), key) == expected


def test_flag_beats_environment_beats_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "steadyrabbit.toml"
    path.write_text("heartbeat = 5\nconcurrency = 3\nprefetch = 9\n")
    monkeypatch.setenv("STEADYRABBIT_CONCURRENCY", "4")
    monkeypatch.setenv("STEADYRABBIT_PREFETCH", "10")
    config = load_config({"prefetch": 11}, path)
    assert (config.heartbeat, config.concurrency, config.prefetch) == (5, 4, 11)


def test_the_file_may_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "elsewhere.toml"
    path.write_text("connect-timeout = 4\n")  # dashed keys as on the command line
    monkeypatch.setenv(CONFIG_ENV, str(path))
    assert load_config({}).connect_timeout == 4.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("heartbeats = 3\n", "config file {path}: unknown setting 'heartbeats'"),
        ("heartbeat = 70000\n", "heartbeat in {path}: input should be less than or equal to"),
        ('retry_delay = [1, "soon"]\n', "retry_delay in {path} (item 2): input should be a"),
        ("retry_delay = [-1]\n", "retry_delay in {path}: delays must be >= 0 seconds"),
        ('queue_type = "stream"\n', "queue_type in {path}: input should be 'classic' or"),
        ("heartbeat = \n", "config file {path}: not valid TOML: "),
    ],
)
def test_file_errors_name_the_file_and_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigurationError) as caught:
        load_config({}, path)
    assert str(caught.value).startswith(expected.format(path=path)), str(caught.value)


def test_each_problem_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("concurrency = 0\n")
    monkeypatch.setenv("STEADYRABBIT_HEARTBEAT", "often")
    with pytest.raises(ConfigurationError) as caught:
        load_config({"prefetch": 0}, path)
    assert sorted(str(caught.value).splitlines()) == [
        "--prefetch: input should be greater than or equal to 1",
        "STEADYRABBIT_HEARTBEAT: input should be a valid integer, unable to parse string as an "
        "integer",
        f"concurrency in {path}: input should be greater than or equal to 1",
    ]


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"config file .*nope\.toml: not found"):
        load_config({}, tmp_path / "nope.toml")


# -- through the real command line, against the real broker ------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("STEADYRABBIT_")}
    return subprocess.run(
        [sys.executable, "-m", "steadyrabbit", *args],
        cwd=ROOT,
        env={**base, **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_doctor_connects_with_settings_from_file_and_environment(
    tmp_path: Path, queue_name: str
) -> None:
    """The broker URL from the file, the heartbeat from the environment: doctor connects with
    both and reports the heartbeat the broker negotiated."""
    path = tmp_path / "steadyrabbit.toml"
    path.write_text(f'url = "{MAIN_URL}"\nheartbeat = 9\nconnect_timeout = 10\n')
    result = run_cli("doctor", "--json", "--config", str(path), env={"STEADYRABBIT_HEARTBEAT": "0"})
    report = json.loads(result.stdout)
    assert report["heartbeat_negotiated"] == 0, report
    with_flag = run_cli(
        "doctor", "--json", "--config", str(path), "--heartbeat", "11",
        env={"STEADYRABBIT_HEARTBEAT": "0"},
    )
    assert json.loads(with_flag.stdout)["heartbeat_negotiated"] == 11


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        pytest.param(
            ["relay", "q", "http://x"], {"STEADYRABBIT_CONCURRENCY": "many"},
            "STEADYRABBIT_CONCURRENCY: input should be a valid integer", id="env",
        ),
        pytest.param(
            ["relay", "q", "http://x", "--config", "{file}"], {},
            "config file {file}: unknown setting 'concurency'", id="file-typo",
        ),
        pytest.param(
            ["relay", "q", "http://x"], {"STEADYRABBIT_CONFIG": "{missing}"},
            "config file {missing}: not found", id="missing-file",
        ),
        pytest.param(
            ["run", "tests.sample_app:app", "--config", "{file}"],
            {"STEADYRABBIT_URL": "amqp://guest:" + PASSWORD + "@127.0.0.1:1/nope?x=1&x=2&bad"},
            "unknown setting 'concurency'", id="password-not-echoed",
        ),
    ],
)
def test_configuration_errors_are_one_line_and_exit_2(
    tmp_path: Path, args: list[str], env: dict[str, str], expected: str
) -> None:
    file = tmp_path / "typo.toml"
    file.write_text("concurency = 2\n")
    missing = tmp_path / "missing.toml"
    fill = {"file": str(file), "missing": str(missing)}
    result = run_cli(
        *(arg.format(**fill) for arg in args),
        env={name: value.format(**fill) for name, value in env.items()},
    )
    assert result.returncode == 2, result
    [line] = result.stderr.splitlines()
    assert line.startswith("steadyrabbit: error: "), line
    assert expected.format(**fill) in line
    assert PASSWORD not in result.stderr + result.stdout


def test_several_problems_are_one_marked_line_each() -> None:
    result = run_cli(
        "relay", "q", "http://x",
        env={"STEADYRABBIT_HEARTBEAT": "often", "STEADYRABBIT_CONCURRENCY": "0"},
    )  # fmt: skip
    assert result.returncode == 2, result
    assert result.stderr.splitlines() == [
        "steadyrabbit: error: STEADYRABBIT_HEARTBEAT: input should be a valid integer, unable "
        "to parse string as an integer",
        "steadyrabbit: error: STEADYRABBIT_CONCURRENCY: input should be greater than or equal "
        "to 1 (see 'steadyrabbit relay --help')",
    ]


def test_a_bad_url_from_the_environment_is_masked() -> None:
    url = f"amqp://guest:{PASSWORD}@127.0.0.1:5672/%2F?heartbeat=never"
    result = run_cli("relay", "q", "http://x", env={"STEADYRABBIT_URL": url})
    assert result.returncode == 2, result
    [line] = result.stderr.splitlines()
    assert "heartbeat" in line
    assert PASSWORD not in line
