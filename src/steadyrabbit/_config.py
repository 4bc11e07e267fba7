"""Configuration from three places, one rule: command-line flag > environment > TOML file.

Every setting has one name. The flag ``--connect-timeout`` is the environment variable
``STEADYRABBIT_CONNECT_TIMEOUT`` and the key ``connect_timeout`` (or ``connect-timeout``) of the
file given by ``--config`` or ``STEADYRABBIT_CONFIG``. :class:`Config` holds every setting of
every command; a command uses those it needs, so one file can serve ``run``, ``relay`` and
``doctor`` alike, while a key that is no setting at all (a typo) is an error.

Values are validated by pydantic, with pydantic-settings reading the environment; an invalid
value becomes one line naming where it came from (the flag, the variable or the file and key)
and what is wrong, never the value itself, which may hold a password.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict

from ._alerts import AlertSettings
from ._errors import ConfigurationError
from ._settings import DEFAULT_URL, Settings

__all__ = ["CONFIG_ENV", "ENV_PREFIX", "Config", "load_config"]

ENV_PREFIX = "STEADYRABBIT_"
#: The environment variable naming the TOML file, when no ``--config`` is given.
CONFIG_ENV = f"{ENV_PREFIX}CONFIG"

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
    concurrency: int = Field(1, ge=1, le=65535)
    prefetch: int | None = Field(None, ge=1, le=65535)
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

    Raises :class:`ConfigurationError` with one line per problem.
    """
    if config_file is None and os.environ.get(CONFIG_ENV):
        config_file = os.environ[CONFIG_ENV]
    from_file = _read_file(Path(config_file)) if config_file is not None else {}
    from_env = dict(EnvSettingsSource(_Environment)())
    values = {**from_file, **from_env, **given}
    try:
        return Config.model_validate(values)
    except ValidationError as exc:
        lines = [
            _describe(error, given, from_env, config_file)
            for error in exc.errors(include_url=False, include_input=False)
        ]
        raise ConfigurationError("\n".join(lines)) from None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigurationError(f"config file {path}: not found") from None
    except OSError as exc:
        raise ConfigurationError(f"config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"config file {path}: not valid TOML: {exc}") from None
    # Flags are spelled with dashes; accept the same spelling in the file.
    return {key.replace("-", "_"): value for key, value in document.items()}


def _describe(
    error: Any,
    given: Mapping[str, Any],
    from_env: Mapping[str, Any],
    config_file: str | os.PathLike[str] | None,
) -> str:
    location = error["loc"]
    key = str(location[0]) if location else ""
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"config file {config_file}: unknown setting {key!r}"
    if key in given:
        where = flag(key)
    elif key in from_env:
        where = env_name(key)
    elif config_file is not None and key:
        where = f"{key} in {config_file}"
    else:
        where = key or "configuration"
    if len(location) > 1:  # an item of a list
        where += f" (item {int(location[1]) + 1})"
    return f"{where}: {message[:1].lower()}{message[1:]}"
