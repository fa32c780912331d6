"""Settings helpers shared by every component.

Each component has one typed settings object (a `ComponentSettings` subclass) read once at start
from, highest first: command-line flags, environment variables, a TOML config file, defaults. A bad
value raises `ConfigError` naming the setting, before the component binds anything.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import textwrap
import tomllib
from contextvars import ContextVar
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Self, TypeVar, Union, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from tickle import wire
from tickle.backoff import Backoff

_config_file: ContextVar[Path | None] = ContextVar("tickle_config_file", default=None)
_secrets_file: ContextVar[Path | None] = ContextVar("tickle_secrets_file", default=None)
_cli_args: ContextVar[list[str] | None] = ContextVar("tickle_cli_args", default=None)

S = TypeVar("S", bound="ComponentSettings")


class ConfigError(Exception):
    """A configuration problem; the message names the setting and what is wrong."""


def default_state_dir(component: str) -> Path:
    """Per-user state directory that works on one machine without root."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tickle" / component


class ComponentSettings(BaseSettings):
    """Base for the settings of one component: logging, and the layered sources."""

    model_config = SettingsConfigDict(extra="forbid", validate_default=True)

    config: Path | None = Field(default=None, description="TOML config file to read")
    secrets_file: Path | None = Field(
        default=None,
        description="TOML file of the secret settings, read with the config file (which can then "
        "be shown and diffed); relative to the config file's directory",
    )
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
        le=3600,
        description="Tickles older or newer than this are stale",
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
        "client is closed for a new one (lowered to fit the open-file limit)",
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
    overrides win over everything (tests use them).
    """
    prefix = str(cls.model_config.get("env_prefix", ""))
    path = _find_config_path(args or [], os.environ.get(f"{prefix}CONFIG"), overrides)
    secrets_path = None
    if path is not None:
        secrets_path = _secrets_path(path, _check_toml(path))
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


def _find_config_path(
    args: list[str], env_value: str | None, overrides: dict[str, Any]
) -> Path | None:
    if overrides.get("config"):
        return Path(overrides["config"])
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            return Path(args[i + 1])
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1])
    return Path(env_value) if env_value else None


def _secrets_path(config: Path, values: dict[str, Any]) -> Path | None:
    """The config file's secrets file, checked: valid TOML, no setting of the config file again."""
    name = values.get("secrets_file")
    if name is None:
        return None
    if not isinstance(name, str) or not name:
        raise ConfigError(f"config: secrets_file in {config} must be a file name")
    path = config.parent / name
    secrets = _check_toml(path)
    both = sorted(set(secrets) & (set(values) | {"secrets_file", "config"}))
    if both:
        raise ConfigError(f"config: setting {', '.join(both)} is in both {config} and {path}")
    return path


def _check_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config: file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc}") from None


def _describe(exc: ValidationError, cls: type[ComponentSettings]) -> str:
    """One line naming each bad setting (its flag and variable), what is wrong, and the value."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    problems = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        top = str(err["loc"][0]) if err["loc"] else ""
        if top in cls.model_fields:
            shown = f"setting {field} (--{top.replace('_', '-')}, {prefix}{top.upper()})"
        else:
            shown = f"setting {field}" if field else ""
        reason = plain_error(err)
        if not shown:  # a check across settings: its input is every setting, secrets included
            problems.append(reason)
        elif err["type"] == "missing":  # its input is every setting, secrets included
            problems.append(f"{shown}: {reason}")
        elif _secret_name(field):  # never a secret's value (check-config's lines reach logs)
            problems.append(f"{shown}: {reason} (value not shown)")
        else:
            problems.append(f"{shown}: {reason} (got {err.get('input')!r})")
    return "invalid configuration: " + "; ".join(problems)


_PLAIN = {
    "missing": "is required",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "bool_parsing": "must be true or false",
    "greater_than": "must be more than {gt}",
    "greater_than_equal": "must be at least {ge}",
    "less_than": "must be less than {lt}",
    "less_than_equal": "must be at most {le}",
    "string_too_short": "must have at least {min_length} character(s)",
    "string_too_long": "must have at most {max_length} characters",
    "too_long": "must have at most {max_length} items",
    "string_pattern_mismatch": "must match {pattern}",
    "literal_error": "must be {expected}",
    "extra_forbidden": "is not a setting",
    "path_not_file": "is not a file",
    "path_not_directory": "is not a directory",
}


def plain_error(err: Any) -> str:
    """A pydantic error (one item of `ValidationError.errors()`) in plain words, no library
    wording: `must be at least 10`."""
    template = _PLAIN.get(err.get("type", ""))
    if template is not None:
        try:
            return template.format(**err.get("ctx", {}))
        except (KeyError, IndexError):
            pass
    return str(err.get("msg", "")).removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _secret_name(field: str) -> bool:
    """Settings whose values are secret: tokens, secrets, passwords, database URLs (a password)."""
    return any(word in field for word in ("secret", "token", "password", "database_url"))


def check_http_url(value: str) -> str:
    """An http(s) URL with a host, without its trailing slash; ValueError naming it otherwise."""
    parsed = urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    return value.rstrip("/")


def hostname() -> str:
    """This machine's short host name, usable as a component name."""
    return socket.gethostname().split(".")[0] or "localhost"


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


def check_config(component: str, cls: type[ComponentSettings], args: list[str]) -> int | None:
    """`tickle COMPONENT --check-config FILE`: exit code 0 when FILE (and its secrets file) is a
    valid configuration, else 2 with one line naming the setting; None without the flag.

    Nothing is bound, created or started (deployment tools run it before replacing a config)."""
    if not any(a == "--check-config" or a.startswith("--check-config=") for a in args):
        return None
    prog = f"tickle {component}"
    rest = list(args)
    i = next(i for i, a in enumerate(rest) if a.startswith("--check-config"))
    flag = rest.pop(i)
    if "=" in flag:
        path = flag.split("=", 1)[1]
    elif i < len(rest):
        path = rest.pop(i)
    else:
        print(f"{prog}: --check-config needs a file", file=sys.stderr)
        return 2
    if rest:
        print(f"{prog}: --check-config takes no other flag (got {' '.join(rest)})", file=sys.stderr)
        return 2
    try:
        load_settings(cls, [], config=path)
    except ConfigError as exc:
        message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"{prog}: {path}: {message}", file=sys.stderr)
        return 2
    print(f"{path}: a valid {component} configuration")
    return 0


# --- help -------------------------------------------------------------------------------------


def settings_help(cls: type[ComponentSettings], usage: str) -> str:
    """The `--help` of a component command: every setting with its flag, variable, default and
    range, worded for an operator (no Python types, no factories)."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    summary = (cls.__doc__ or "").strip().splitlines()[0]
    lines = [
        f"Usage: {usage} [OPTIONS]",
        "",
        f"  {summary}",
        "",
        "  Each setting comes from, highest first: its flag, its environment variable, the TOML",
        "  file named by --config, its default.",
        "",
        "Options:",
    ]
    for name, field in cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        shown = (
            f"{flag} / --no-{flag[2:]}"
            if _annotation(field) is bool
            else f"{flag} {_metavar(name, field)}"
        )
        text = (field.description or name.replace("_", " ")).rstrip(".")
        facts = [f"default: {shown_default(field)}"]
        facts += [f"range: {r}"] if (r := _range(field)) else []
        facts.append(f"env: {prefix}{name.upper()}")
        lines.append(f"  {shown}")
        lines += textwrap.wrap(
            f"{text} [{'; '.join(facts)}]", width=88, initial_indent=" " * 6,
            subsequent_indent=" " * 6, break_on_hyphens=False,
        )  # fmt: skip
    lines += ["  -h, --help", "      Show this message and exit."]
    return "\n".join(lines) + "\n"


def shown_default(field: FieldInfo) -> str:
    """A setting's default as an operator should read it, the same on every machine."""
    if field.is_required():
        return "(required)"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, Path):
        value = str(value).replace(str(Path.home()), "~")
    if field.default_factory is not None and value == hostname():
        return "(host name)"
    if value is None:
        return "(unset)"
    if value == "":
        return '""'
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "(none)"
    return str(value)


def _annotation(field: FieldInfo) -> Any:
    """The field's type without `| None` and constraints."""
    kind = field.annotation
    args = [a for a in get_args(kind) if a is not type(None)]
    if get_origin(kind) in (UnionType, Union) and args:
        kind = args[0]
    return get_args(kind)[0] if get_origin(kind) is Annotated else kind


def _metavar(name: str, field: FieldInfo) -> str:
    kind = _annotation(field)
    if get_origin(kind) is Literal:
        return "{" + "|".join(map(str, get_args(kind))) + "}"
    if get_origin(kind) is list:
        return "LIST"
    if kind is int:
        return "INTEGER"
    if kind is float:
        return "SECONDS" if name.endswith("_s") else "NUMBER"
    if isinstance(kind, type) and issubclass(kind, Path):
        return "PATH"
    if name.endswith("_url") or name.endswith("_urls"):
        return "URL"
    return "TEXT"


def _range(field: FieldInfo) -> str:
    """`1..65535`, `more than 0, at most 600`... from the field's constraints ('' if none)."""
    bounds: dict[str, Any] = {}
    for item in field.metadata:
        for key in ("gt", "ge", "lt", "le"):
            if getattr(item, key, None) is not None:
                bounds[key] = getattr(item, key)
    if "ge" in bounds and "le" in bounds:
        return f"{bounds['ge']}..{bounds['le']}"
    words = {"gt": "more than", "ge": "at least", "lt": "less than", "le": "at most"}
    return ", ".join(f"{words[k]} {v}" for k, v in bounds.items())
