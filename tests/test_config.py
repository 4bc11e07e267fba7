"""Configuration: every setting by flag, STEADYRABBIT_* variable and TOML file, in that order of
precedence, validated into one readable line per problem."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import click
import pytest
from hypothesis import HealthCheck, assume, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from steadyrabbit import App, Message, Settings
from steadyrabbit._cli import cli
from steadyrabbit._config import (
    CONFIG_ENV,
    ENV_PREFIX,
    OTHER_VARIABLES,
    Config,
    env_name,
    flag,
    load_config,
)
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
    "idempotency": (False, "false", False),
    "idempotency_store": ("redis://cache:6379/2", "redis://cache:6379/2", "redis://cache:6379/2"),
    "idempotency_retention": (86400, "86400", 86400.0),
    "lease": (12, "12", 12.0),
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


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string (JSON's escapes of characters beyond U+FFFF are not
    TOML's)."""
    escaped = "".join(
        f"\\u{ord(char):04x}" if ord(char) < 0x20 or ord(char) == 0x7F else char
        for char in text.replace("\\", "\\\\").replace('"', '\\"')
    )
    return f'"{escaped}"'


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
        load_config({"prefetch": -1}, path)
    assert sorted(str(caught.value).splitlines()) == [
        "--prefetch: input should be greater than or equal to 0",
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
            "config file {file}: unknown setting 'concurency' (did you mean 'concurrency'?)",
            id="file-typo",
        ),
        pytest.param(
            ["relay", "q", "http://x"], {"STEADYRABBIT_HEARTBEET": PASSWORD},
            "environment variable STEADYRABBIT_HEARTBEET: not a steadyrabbit setting (did you "
            "mean STEADYRABBIT_HEARTBEAT?)", id="variable-typo",
        ),
        pytest.param(
            ["top", "9100", "--once"], {"STEADYRABBIT_INTERVALL": PASSWORD},
            "environment variable STEADYRABBIT_INTERVALL: not a steadyrabbit setting (did you "
            "mean STEADYRABBIT_INTERVAL?)", id="variable-typo-top",
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


# -- a misspelt name is never silently ignored ---------------------------------------------------

#: A value no error line may show (it could be a password).
SECRET = "Sekr1t-value-0f-a-setting"
SETTINGS = sorted(Config.model_fields)
# The monkeypatch of clean_environment runs once per test, not per example: each example sets
# up and restores its own environment (mock.patch.dict), so sharing it is safe.
PROPERTY = hypothesis_settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@st.composite
def misspellings(draw: st.DrawFn) -> tuple[str, str]:
    """(a setting, a one-edit misspelling of it that is no setting): a letter dropped,
    doubled, swapped with the next or replaced."""
    key = draw(st.sampled_from(SETTINGS))
    at = draw(st.integers(0, len(key) - 1))
    edit = draw(st.sampled_from(["drop", "double", "swap", "replace"]))
    letter = draw(st.sampled_from("abcdefghijklmnopqrstuvwxyz_"))
    if edit == "drop":
        wrong = key[:at] + key[at + 1 :]
    elif edit == "double":
        wrong = key[:at] + key[at] + key[at:]
    elif edit == "swap":
        wrong = key[:at] + key[at + 1 : at + 2] + key[at] + key[at + 2 :]
    else:
        wrong = key[:at] + letter + key[at + 1 :]
    assume(wrong.replace("-", "_") not in Config.model_fields and wrong.strip("_"))
    return key, wrong


def closeness(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()


def check_suggestion(line: str, key: str, wrong: str, quote: str = "'") -> None:
    """A misspelling of ``key`` is answered with ``key`` or a setting at least as close."""
    found = re.search(rf"\(did you mean {quote}([a-z_]+){quote}\?\)$", line.lower())
    if len(key) >= 6:  # one edit in six letters or more is always close enough
        assert found is not None, line
    if found is not None:
        suggested = found.group(1).removeprefix(ENV_PREFIX.lower())
        assert suggested in Config.model_fields or ENV_PREFIX + suggested.upper() in (
            OTHER_VARIABLES
        ), line
        if suggested != key:
            assert closeness(wrong.lower(), suggested) >= closeness(wrong.lower(), key), line


def only_line(error: pytest.ExceptionInfo[ConfigurationError]) -> str:
    lines = str(error.value).splitlines()
    assert len(lines) == 1, lines
    assert SECRET not in lines[0]
    return lines[0]


@PROPERTY
@given(misspellings())
@example(("heartbeat", "hearbeat"))
@example(("concurrency", "concurency"))
def test_a_misspelt_file_key_is_one_line_with_a_suggestion(
    tmp_path: Path, misspelt: tuple[str, str]
) -> None:
    key, wrong = misspelt
    path = tmp_path / "typo.toml"
    path.write_text(f"{json.dumps(wrong)} = {json.dumps(SECRET)}\n")
    with pytest.raises(ConfigurationError) as caught:
        load_config({}, path)
    line = only_line(caught)
    assert line.startswith(f"config file {path}: unknown setting {wrong!r}"), line
    check_suggestion(line, key, wrong)


@PROPERTY
@given(
    st.text(
        st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
        min_size=1,
        max_size=40,
    )
)
@example("alerts")
@example("a\nb")
@example("HEARTBEAT")
def test_any_unknown_file_key_is_one_line_naming_it(tmp_path: Path, name: str) -> None:
    assume(name.replace("-", "_") not in Config.model_fields)
    path = tmp_path / "unknown.toml"
    path.write_text(f"{toml_string(name)} = {json.dumps(SECRET)}\n", encoding="utf-8")
    with pytest.raises(ConfigurationError) as caught:
        load_config({}, path)
    line = only_line(caught)
    assert line.startswith(f"config file {path}: unknown setting {name!r}"), line


def setting_environment(**variables: str) -> Any:
    """The process environment with no STEADYRABBIT_* variable but ``variables``."""
    kept = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
    return mock.patch.dict(os.environ, {**kept, **variables}, clear=True)


@PROPERTY
@given(misspellings(), st.booleans())
@example(("heartbeat", "hearbeat"), True)
@example(("state_dir", "statedir"), True)
def test_a_misspelt_variable_is_one_line_with_a_suggestion(
    misspelt: tuple[str, str], upper: bool
) -> None:
    key, wrong = misspelt
    name = ENV_PREFIX + (wrong.upper() if upper else wrong)
    assume(name.upper() not in OTHER_VARIABLES)
    with setting_environment(**{name: SECRET}), pytest.raises(ConfigurationError) as caught:
        load_config({})
    line = only_line(caught)
    assert line.startswith(f"environment variable {name}: not a steadyrabbit setting"), line
    check_suggestion(line, key, wrong, quote="")


@PROPERTY
@given(st.text(st.characters(whitelist_categories=["Lu", "Ll", "Nd", "Pc", "Pd"]), max_size=30))
@example("PASSWORD")
@example("")
def test_any_unknown_variable_is_one_line_naming_it(suffix: str) -> None:
    name = ENV_PREFIX + suffix
    assume(name.upper() not in {env_name(key) for key in Config.model_fields} | OTHER_VARIABLES)
    assume("\x00" not in name)
    with setting_environment(**{name: SECRET}), pytest.raises(ConfigurationError) as caught:
        load_config({})
    line = only_line(caught)
    assert line.startswith("environment variable "), line
    shown = name if re.fullmatch(r"[A-Za-z0-9_.-]{1,80}", name) else repr(name[:80])
    assert f"environment variable {shown}: not a steadyrabbit setting" in line


def test_variables_that_are_no_setting_but_known_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("")
    known = dict.fromkeys(OTHER_VARIABLES, "1") | {CONFIG_ENV: str(path)}
    with setting_environment(**known, steadyrabbit_heartbeat="9"):
        assert load_config({}).heartbeat == 9  # in any case, as pydantic-settings reads it


def test_every_steadyrabbit_variable_the_project_uses_is_known() -> None:
    """Scripts, tests, docs and code name no STEADYRABBIT_* variable that load_config would
    refuse as a misspelling (this file misspells some on purpose)."""
    known = {env_name(key) for key in Config.model_fields} | OTHER_VARIABLES
    files = [ROOT / "README.md"]
    for folder in ("src", "tests", "scripts", "bench", ".ci", "docs"):
        files += [path for path in (ROOT / folder).rglob("*") if path.is_file()]
    used: set[str] = set()
    for path in files:
        if path.suffix in {".pyc", ".db"} or ".egg-info" in str(path) or path == Path(__file__):
            continue
        text = path.read_text("utf-8", "replace")
        used |= set(re.findall(r"STEADYRABBIT_[A-Z0-9_]*[A-Z0-9]", text))
    not_variables = {"STEADYRABBIT_PRODUCT"}  # a Python constant in _doctor.py
    assert used - known - not_variables == set()


def test_a_setting_written_twice_in_a_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "twice.toml"
    path.write_text("connect-timeout = 4\nconnect_timeout = 5\n")
    with pytest.raises(ConfigurationError) as caught:
        load_config({}, path)
    assert str(caught.value) == (
        f"config file {path}: 'connect-timeout' and 'connect_timeout' are the same setting; "
        "keep one"
    )


def test_problems_in_file_and_environment_are_reported_together(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text("hearbeat = 3\nconcurrency = 0\n")
    with (
        setting_environment(STEADYRABBIT_CONECT_TIMEOUT=SECRET),
        pytest.raises(ConfigurationError) as caught,
    ):
        load_config({}, path)
    assert sorted(str(caught.value).splitlines()) == [
        f"concurrency in {path}: input should be greater than or equal to 1",
        f"config file {path}: unknown setting 'hearbeat' (did you mean 'heartbeat'?)",
        "environment variable STEADYRABBIT_CONECT_TIMEOUT: not a steadyrabbit setting (did you "
        "mean STEADYRABBIT_CONNECT_TIMEOUT?)",
    ]


def test_where_each_setting_came_from(tmp_path: Path) -> None:
    path = tmp_path / "where.toml"
    path.write_text("heartbeat = 5\nconcurrency = 3\n")
    with setting_environment(STEADYRABBIT_CONCURRENCY="4"):
        config = load_config({"prefetch": 8}, path)
    assert config.source("prefetch") == "--prefetch"
    assert config.source("concurrency") == "STEADYRABBIT_CONCURRENCY"
    assert config.source("heartbeat") == f"heartbeat in {path}"
    assert config.source("url") is None
    assert config.sources(["url", "concurrency", "heartbeat"]) == {
        "concurrency": "STEADYRABBIT_CONCURRENCY",
        "heartbeat": f"heartbeat in {path}",
    }


# -- Settings(url=...), as the README, the flags and the file say ----------------------------


@given(
    st.lists(
        st.sampled_from(["amqp://a/%2F", "amqp://u:pw-Secret@b:5673/v", "amqps://c"]),
        min_size=1,
        max_size=3,
    ),
    st.booleans(),
)
def test_settings_take_url_as_well_as_urls(urls: list[str], as_string: bool) -> None:
    given_url: str | list[str] = urls[0] if as_string else urls
    expected = (urls[0],) if as_string else tuple(urls)
    settings = Settings(url=given_url)
    assert settings.urls == settings.url == expected
    assert settings == Settings(urls=given_url)
    assert "pw-Secret" not in repr(settings)
    changed = dataclasses.replace(settings, heartbeat=5)
    assert (changed.urls, changed.heartbeat) == (expected, 5)
    with pytest.raises(ConfigurationError, match="url or as urls, not both"):
        Settings(url=given_url, urls=given_url)


def test_settings_init_takes_every_field() -> None:
    """The hand-written __init__ (for url) keeps up with the fields."""
    parameters = list(inspect.signature(Settings.__init__).parameters)[1:]
    fields = [field.name for field in dataclasses.fields(Settings) if field.init]
    assert parameters == [*fields, "url"]
    assert Settings().urls == Settings.urls


# -- concurrency and prefetch: the defaults of consumers that set none -----------------------

_window = st.one_of(st.none(), st.integers(min_value=1, max_value=40))


@given(own=st.tuples(_window, _window), defaults=st.tuples(_window, _window))
@example(own=(None, None), defaults=(4, None))
@example(own=(8, None), defaults=(None, 4))
@example(own=(None, 2), defaults=(4, None))
def test_run_defaults_apply_to_consumers_without_their_own(
    own: tuple[int | None, int | None], defaults: tuple[int | None, int | None]
) -> None:
    """A value the consumer gave wins; else the default; else concurrency 1 and prefetch =
    concurrency. A default that leaves prefetch below the concurrency is refused."""
    app = App()

    def handle(message: Message) -> None: ...

    try:
        app.add_consumer(handle, "q", concurrency=own[0], prefetch=own[1])
    except ConfigurationError:
        assume(False)  # the consumer's own values do not fit: no default involved
    concurrency = own[0] or defaults[0] or 1
    prefetch = own[1] or defaults[1] or concurrency
    if prefetch < concurrency:
        with pytest.raises(ConfigurationError, match="queue 'q': the default") as caught:
            app.apply_defaults(concurrency=defaults[0], prefetch=defaults[1])
        assert "\n" not in str(caught.value)
        assert (app.handlers[0].concurrency, app.handlers[0].own_concurrency) == (
            own[0] or 1, own[0]
        ), "nothing changed"
        return
    app.apply_defaults(concurrency=defaults[0], prefetch=defaults[1])
    later = App()
    later.apply_defaults(concurrency=defaults[0], prefetch=defaults[1])
    later.add_consumer(handle, "q", concurrency=own[0], prefetch=own[1])
    for spec in (app.handlers[0], later.handlers[0]):
        assert (spec.concurrency, spec.prefetch) == (concurrency, prefetch)
        assert spec.threaded is not None
        assert spec.threaded._threads == concurrency  # the pool it will run in
