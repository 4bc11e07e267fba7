"""Configuration from three places, one rule: command-line flag > environment > TOML file.

Every setting has one name. The flag ``--connect-timeout`` is the environment variable
``STEADYRABBIT_CONNECT_TIMEOUT`` and the key ``connect_timeout`` (or ``connect-timeout``) of the
file given by ``--config`` or ``STEADYRABBIT_CONFIG``. :class:`Config` holds every setting of
every command; a command uses those it needs, so one file can serve ``run``, ``relay`` and
``doctor`` alike, while a key that is no setting at all (a typo) is an error.

Values are validated by pydantic, with pydantic-settings reading the environment; an invalid
value becomes one line naming where it came from (the flag, the variable or the file and key)
and what is wrong, never the value itself, which may hold a password. A file key or a
``STEADYRABBIT_*`` variable that is no setting is an error too, with the nearest setting as a
suggestion: a misspelt name must not be silently ignored.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict

from ._alert_settings import AlertSettings
from ._errors import ConfigurationError
from ._settings import DEFAULT_URL, Settings

__all__ = ["CONFIG_ENV", "ENV_PREFIX", "OTHER_VARIABLES", "Config", "load_config"]

ENV_PREFIX = "STEADYRABBIT_"
#: The environment variable naming the TOML file, when no ``--config`` is given.
CONFIG_ENV = f"{ENV_PREFIX}CONFIG"
#: ``STEADYRABBIT_*`` variables that are no setting but have a meaning of their own: the file,
#: the pipe of a ``--processes`` worker to its supervisor, and those of ``scripts/`` and the
#: test suite. Any other variable with the prefix is a misspelt setting, and an error.
OTHER_VARIABLES = frozenset(
    {
        CONFIG_ENV,
        f"{ENV_PREFIX}SUPERVISOR_FD",
        f"{ENV_PREFIX}SKIP_BROWSER",
        f"{ENV_PREFIX}TEST_URL",
        f"{ENV_PREFIX}TEST_POSTGRES",
        f"{ENV_PREFIX}TEST_REDIS",
        f"{ENV_PREFIX}RABBITMQ4",
    }
)

_Seconds = Annotated[float, Field(allow_inf_nan=False)]
#: Lists given as one string (an environment variable, a single flag) are comma-separated.
_CommaList = Annotated[tuple[str, ...], NoDecode]
_SecondsList = Annotated[tuple[_Seconds, ...], NoDecode]


class Config(BaseModel):
    """Every setting of every steadyrabbit command, validated; defaults are the documented ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # -- the broker and logging (every command that talks to a broker)
    url: _CommaList = (DEFAULT_URL,)
    heartbeat: int = Field(15, ge=0, le=65535)
    connect_timeout: _Seconds = Field(60.0, gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["plain", "json"] = "plain"
    # -- a worker (run, relay; doctor checks against them)
    grace_period: _Seconds = Field(30.0, ge=0)
    consumer_timeout: _Seconds = Field(1800.0, gt=0)
    state_dir: Path | None = None
    processes: int = Field(1, ge=1, le=1024)
    metrics_port: int | None = Field(None, ge=0, le=65535)
    metrics_host: str | None = Field(None, min_length=1)
    idempotency: bool = True
    idempotency_store: str | None = Field(None, min_length=1)
    idempotency_retention: _Seconds = Field(7 * 86400.0, gt=0)
    lease: _Seconds = Field(30.0, gt=0, le=86400)
    # run: the defaults of consumers registered without their own; relay: its consumer's.
    concurrency: int = Field(1, ge=1, le=65535)
    # 0 (unlimited) only describes another consumer to doctor; a worker refuses it.
    prefetch: int | None = Field(None, ge=0, le=65535)
    # -- the relay
    exchange: str | None = None
    routing_key: str | None = None
    http_timeout: _Seconds = Field(30.0, gt=0)
    max_attempts: int = Field(5, ge=1)
    retry_delay: _SecondsList = ()
    queue_type: Literal["classic", "quorum"] = "classic"
    # -- alerts (run, relay)
    alert_smtp_url: str | None = None
    alert_email_from: str | None = None
    alert_email_to: _CommaList = ()
    alert_webhook_url: str | None = None
    alert_group_wait: _Seconds = Field(30.0, gt=0)
    alert_repeat_interval: _Seconds = Field(900.0, gt=0)
    alert_reconnect_threshold: int = Field(3, ge=1)
    alert_reconnect_window: _Seconds = Field(300.0, gt=0)
    alert_stuck_after: _Seconds | None = Field(None, gt=0)
    alert_body_chars: int = Field(200, ge=10)
    # -- doctor
    handler_seconds: _Seconds | None = Field(None, gt=0)
    management_url: str | None = None
    # -- top
    interval: _Seconds = Field(1.0, gt=0)

    #: Where each setting given explicitly came from (see :meth:`source`).
    _sources: dict[str, str] = PrivateAttr(default_factory=dict)

    def source(self, key: str) -> str | None:
        """Where the setting ``key`` was given: ``--flag``, ``STEADYRABBIT_<KEY>`` or ``key in
        FILE``; None when it has its default."""
        return self._sources.get(key)

    def sources(self, keys: Iterable[str]) -> dict[str, str]:
        """Those of ``keys`` that were given, with where (as :meth:`source`), in that order."""
        return {key: self._sources[key] for key in keys if key in self._sources}

    @field_validator("url", "alert_email_to", "retry_delay", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple):
            parts: list[Any] = []
            for item in value:
                if isinstance(item, str):
                    parts.extend(part.strip() for part in item.split(",") if part.strip())
                else:
                    parts.append(item)
            return tuple(parts)
        return value

    @field_validator("url")
    @classmethod
    def _some_url(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("no broker URL given")
        return value

    @field_validator("retry_delay")
    @classmethod
    def _non_negative(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(delay < 0 for delay in value):
            raise ValueError("delays must be >= 0 seconds")
        return value

    def settings(self) -> Settings:
        """The worker :class:`Settings` these values describe (raises ConfigurationError)."""
        if self.metrics_port is None and self.metrics_host is not None:
            raise ConfigurationError("--metrics-host needs --metrics-port")
        return Settings(
            alerts=self.alerts(),
            urls=self.url,
            heartbeat=self.heartbeat,
            connect_timeout=self.connect_timeout,
            grace_period=self.grace_period,
            consumer_timeout=self.consumer_timeout,
            state_dir=self.state_dir,
            metrics_port=self.metrics_port,
            metrics_host=self.metrics_host or Settings.metrics_host,
            idempotency=self.idempotency,
            idempotency_store=self.idempotency_store,
            idempotency_retention=self.idempotency_retention,
            lease=self.lease,
        )

    def alerts(self) -> AlertSettings | None:
        """The alert settings, or None when no destination is configured (alerts off)."""
        destinations = (
            self.alert_smtp_url, self.alert_email_from, self.alert_email_to,
            self.alert_webhook_url,
        )  # fmt: skip
        if not any(destinations):
            return None
        return AlertSettings(
            smtp_url=self.alert_smtp_url,
            email_from=self.alert_email_from,
            email_to=self.alert_email_to,
            webhook_url=self.alert_webhook_url,
            group_wait=self.alert_group_wait,
            repeat_interval=self.alert_repeat_interval,
            reconnect_threshold=self.alert_reconnect_threshold,
            reconnect_window=self.alert_reconnect_window,
            stuck_after=self.alert_stuck_after,
            body_chars=self.alert_body_chars,
        )


class _Environment(Config, BaseSettings):
    """Reads ``STEADYRABBIT_*`` variables for :class:`Config`; never instantiated."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def load_config(
    given: Mapping[str, Any],
    config_file: str | os.PathLike[str] | None = None,
) -> Config:
    """Validate ``given`` (values from flags, keyed like :class:`Config`) over the environment
    over ``config_file`` (default: ``$STEADYRABBIT_CONFIG``, else none).

    Raises :class:`ConfigurationError` with one line per problem: an invalid value, a file key
    that is no setting, a ``STEADYRABBIT_*`` variable that is none.
    """
    if config_file is None and os.environ.get(CONFIG_ENV):
        config_file = os.environ[CONFIG_ENV]
    from_file, problems = _read_file(Path(config_file)) if config_file is not None else ({}, [])
    problems += _unknown_variables(os.environ)
    from_env = dict(EnvSettingsSource(_Environment)())
    values = {**from_file, **from_env, **given}
    try:
        config = Config.model_validate(values)
    except ValidationError as exc:
        problems += [
            _describe(error, given, from_env, config_file)
            for error in exc.errors(include_url=False, include_input=False)
        ]
        raise ConfigurationError("\n".join(problems)) from None
    if problems:
        raise ConfigurationError("\n".join(problems))
    config._sources = {
        key: _where(key, given, from_env, config_file)
        for key in Config.model_fields
        if key in values
    }
    return config


def _unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One line for each ``STEADYRABBIT_*`` variable that is neither a setting nor one of
    :data:`OTHER_VARIABLES`, with the nearest name when one is close (pydantic-settings would
    silently ignore it). Names are matched as pydantic-settings reads them: in any case."""
    known = {env_name(key) for key in Config.model_fields} | OTHER_VARIABLES
    problems = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known:
            continue
        # Compared without the prefix, which every candidate shares.
        suffix = upper.removeprefix(ENV_PREFIX).replace("-", "_")
        guess = _nearest(suffix, (name.removeprefix(ENV_PREFIX) for name in known))
        hint = f" (did you mean {ENV_PREFIX}{guess}?)" if guess else ""
        problems.append(f"environment variable {_shown(name)}: not a steadyrabbit setting{hint}")
    return problems


def _nearest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``name`` (a misspelling of it), if one is close enough."""
    matches = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.7)
    return matches[0] if matches else None


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,80}")


def _shown(name: str) -> str:
    """A name as an error line shows it: as it is when plain, else quoted with escapes, so that
    it stays on its line and shows what is odd about it."""
    return name if _PLAIN_NAME.fullmatch(name) else repr(name[:80])


def _read_file(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The settings in the TOML file ``path``, keyed like :class:`Config`, and one line for
    each key that is no setting or gives a setting twice (``a-b`` and ``a_b``).

    Raises :class:`ConfigurationError` for a file that cannot be read or is not TOML.
    """
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigurationError(f"config file {path}: not found") from None
    except OSError as exc:
        raise ConfigurationError(f"config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"config file {path}: not valid TOML: {exc}") from None
    settings: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    problems: list[str] = []
    for written, value in document.items():
        # Flags are spelled with dashes; accept the same spelling in the file.
        key = written.replace("-", "_")
        if key not in Config.model_fields:
            guess = _nearest(key.lower(), Config.model_fields)
            hint = f" (did you mean {guess!r}?)" if guess else ""
            problems.append(f"config file {path}: unknown setting {_quoted(written)}{hint}")
        elif key in spelled:
            problems.append(
                f"config file {path}: {_quoted(spelled[key])} and {_quoted(written)} are the "
                "same setting; keep one"
            )
        else:
            settings[key] = value
            spelled[key] = written
    return settings, problems


def _quoted(key: str) -> str:
    """A file key as an error line shows it: quoted, with escapes, at most 80 characters."""
    return repr(key if len(key) <= 80 else key[:79] + "…")


def _where(
    key: str,
    given: Mapping[str, Any],
    from_env: Mapping[str, Any],
    config_file: str | os.PathLike[str] | None,
) -> str:
    """Where the value of ``key`` came from: the flag, the variable, or the file and key."""
    if key in given:
        return flag(key)
    if key in from_env:
        return env_name(key)
    if config_file is not None and key:
        return f"{key} in {config_file}"
    return key or "configuration"


def _describe(
    error: Any,
    given: Mapping[str, Any],
    from_env: Mapping[str, Any],
    config_file: str | os.PathLike[str] | None,
) -> str:
    location = error["loc"]
    key = str(location[0]) if location else ""
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":  # only from code: flags and files are checked
        return f"{key!r}: not a setting"
    where = _where(key, given, from_env, config_file)
    if len(location) > 1:  # an item of a list
        where += f" (item {int(location[1]) + 1})"
    return f"{where}: {message[:1].lower()}{message[1:]}"
