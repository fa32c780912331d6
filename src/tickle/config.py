"""Settings helpers shared by every component.

Each component has one typed settings object (a `ComponentSettings` subclass) read once at start
from, highest first: command-line flags, environment variables, a TOML config file, defaults. A bad
value raises `ConfigError` naming the setting, before the component binds anything.
"""

from __future__ import annotations

import os
import secrets
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from tickle import settingsbase as _base
from tickle import wire
from tickle.backoff import Backoff

# what every component's settings share lives in tickle.settingsbase (no pydantic: the agent's
# settings are read there); named here too, as the servers have always found them
ConfigError = _base.ConfigError
check_http_url = _base.check_http_url
default_state_dir = _base.default_state_dir
hostname = _base.hostname
plain_error = _base.plain_error
settings_help = _base.settings_help
shown_default = _base.shown_default

_config_file: ContextVar[Path | None] = ContextVar("tickle_config_file", default=None)
_secrets_file: ContextVar[Path | None] = ContextVar("tickle_secrets_file", default=None)
_cli_args: ContextVar[list[str] | None] = ContextVar("tickle_cli_args", default=None)

S = TypeVar("S", bound="ComponentSettings | _base.LeanSettings")


class ComponentSettings(BaseSettings):
    """Base for the settings of one component: logging, and the layered sources."""

    model_config = SettingsConfigDict(extra="forbid", validate_default=True)

    config: Path | None = Field(default=None, description=_base.CONFIG_DESCRIPTION)
    secrets_file: Path | None = Field(default=None, description=_base.SECRETS_FILE_DESCRIPTION)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level"
    )
    log_format: Literal["text", "json"] = Field(default="text", description="Log line format")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings]
        args = _cli_args.get()
        if args is not None:
            sources.append(
                CliSettingsSource(
                    settings_cls,
                    cli_parse_args=args,
                    cli_kebab_case=True,
                    cli_implicit_flags=True,
                    cli_exit_on_error=False,
                    cli_prog_name="tickle",
                )
            )
        sources.append(env_settings)
        path = _config_file.get()
        for toml_file in (path, _secrets_file.get()):
            if toml_file is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


# The window a tickle's send time must fall in, on every component that sends or receives them.
FreshnessWindowS = Annotated[
    float,
    Field(
        default=wire.DEFAULT_FRESHNESS_S,
        gt=0,
        le=_base.FRESHNESS_MAX_S,
        description=_base.FRESHNESS_DESCRIPTION,
    ),
]


class TickleSenderSettings(ComponentSettings):
    """Settings of a component that sends confirmed tickles (the NS and the task servers)."""

    freshness_window_s: FreshnessWindowS
    tickle_tries: int = Field(
        default=6, ge=1, le=100, description="Tickle sends to one target before it is unreachable"
    )
    tickle_backoff_s: float = Field(
        default=0.5, gt=0, le=600, description="First resend delay of an unacknowledged tickle (s)"
    )
    tickle_backoff_max_s: float = Field(
        default=8.0, gt=0, le=3600, description="Longest resend delay of a tickle (s)"
    )

    @model_validator(mode="after")
    def _backoff_order(self) -> Self:
        if self.tickle_backoff_max_s < self.tickle_backoff_s:
            raise ValueError("tickle_backoff_max_s must be >= tickle_backoff_s")
        return self

    def tickle_backoff(self) -> Backoff:
        """The resend schedule of this component's tickles."""
        return Backoff(
            base_s=self.tickle_backoff_s, max_s=self.tickle_backoff_max_s, tries=self.tickle_tries
        )


KIB = 1024
MIB = 1024 * KIB


class ApiServerSettings(ComponentSettings):
    """Settings of a component that serves an HTTP API (the NS and the task servers): its limits.

    `tickle.serving` enforces them; each default fits the traffic of a large fleet.
    """

    max_connections: int = Field(
        default=4096,
        ge=16,
        le=1_000_000,
        description="API connections open at once; at the cap the one waiting longest on its "
        "client is closed for a new one (lowered to fit the open-file limit). Crowded (three "
        "quarters open), answers close their connections (but a task server's agent pulls and "
        "long-polls), those idle a while are closed for room, and a task server tickles no "
        "more agents until there is room",
    )
    request_head_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="Time a client has to send a request line and headers (s); then 408, closed",
    )
    request_body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Time a client has to send a request body after its headers (s); then 408",
    )
    max_header_bytes: int = Field(
        default=16 * KIB,
        ge=KIB,
        le=MIB,
        description="Largest request line and headers (bytes); beyond it 431",
    )
    max_headers: int = Field(
        default=100, ge=16, le=10_000, description="Most headers in a request; beyond it 431"
    )
    max_body_bytes: int = Field(
        default=8 * MIB,
        ge=64 * KIB,
        le=1024 * MIB,
        description="Largest request body from a caller with valid credentials (bytes; event "
        "batches, run-nows); beyond it 413",
    )
    max_registration_body_bytes: int = Field(
        default=16 * KIB,
        ge=KIB,
        le=MIB,
        description="Largest body of a registration, and of any request without valid "
        "credentials (bytes); beyond it 413",
    )

    @field_validator("max_registration_body_bytes")
    @classmethod
    def _within_max_body(cls, value: int, info: ValidationInfo) -> int:
        largest = info.data.get("max_body_bytes")
        if largest is not None and value > largest:
            raise ValueError(f"must not exceed max_body_bytes ({largest})")
        return value


def load_settings(cls: type[S], args: list[str] | None = None, **overrides: Any) -> S:
    """Read the component's settings from flags, environment and config file.

    `args` are the component's command-line flags (`--api-port 50120`, `--config PATH`). Keyword
    overrides win over everything (tests use them). A `LeanSettings` class (the agent's) is
    read by `tickle.settingsbase.load_settings`, from the same sources with the same rules.
    """
    if isinstance(cls, type) and issubclass(cls, _base.LeanSettings):
        return _base.load_settings(cls, args, **overrides)
    prefix = str(cls.model_config.get("env_prefix", ""))
    path = _base.find_config_path(args or [], os.environ.get(f"{prefix}CONFIG"), overrides)
    secrets_path = None
    if path is not None:
        secrets_path = _base.secrets_path(path, _base.read_toml(path))
    token_f = _config_file.set(path)
    token_s = _secrets_file.set(secrets_path)
    token_a = _cli_args.set(list(args) if args is not None else None)
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, cls)) from None
    except SystemExit as exc:  # argparse inside the CLI source (help is answered before)
        if exc.code in (0, None):  # --help all the same: printed, a success
            raise
        raise ConfigError(f"bad command-line flags (exit {exc})") from None
    except Exception as exc:  # the CLI source raises SettingsError for unknown flags
        message = str(exc).removeprefix("error parsing CLI: ")
        raise ConfigError(message.replace("unrecognized arguments:", "unknown options:")) from None
    finally:
        _config_file.reset(token_f)
        _secrets_file.reset(token_s)
        _cli_args.reset(token_a)


def _describe(exc: ValidationError, cls: type[ComponentSettings]) -> str:
    """One line naming each bad setting (its flag and variable), what is wrong, and the value."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    problems = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        top = str(err["loc"][0]) if err["loc"] else ""
        reason = plain_error(err)
        if not field:  # a check across settings: its input is every setting, secrets included
            problems.append(reason)
            continue
        missing = err["type"] == "missing"  # its input is every setting, secrets included
        known = top in cls.model_fields
        value = err.get("input")
        problems.append(_base.describe_problem(field, prefix, reason, value, missing, known))
    return "invalid configuration: " + "; ".join(problems)


def read_or_create_secret(path: Path) -> str:
    """Return the secret stored at `path`, creating it (mode 0600) on first use."""
    try:
        value = path.read_text().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def check_config(component: str, cls: type[Any], args: list[str]) -> int | None:
    """`tickle COMPONENT --check-config FILE` (see `tickle.settingsbase.check_config`)."""
    return _base.check_config(component, cls, args, load_settings)
