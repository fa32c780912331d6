"""Settings without pydantic: what every component's settings share, and the agent's loader.

Each component has one typed settings object read once at start from, highest first: command-line
flags, environment variables, a TOML config file, defaults. A bad value raises `ConfigError`
naming the setting, its flag and variable, what is wrong and the value it got.

The servers' settings are pydantic-settings classes (`tickle.config`). The agent's are a
`LeanSettings`: a msgspec Struct whose fields carry their limits and description in
`msgspec.Meta`, loaded here from the same sources with the same rules and the same messages —
the agent loads no pydantic at all (S7 of issue 10). Both kinds answer the same questions for
`--help` and the README's table (`model_fields`, `model_config`), so those read either.
"""

from __future__ import annotations

import argparse
import dataclasses
import operator
import os
import socket
import sys
import textwrap
import tomllib
from collections.abc import Callable
from pathlib import Path
from types import UnionType
from typing import (
    Annotated,
    Any,
    ClassVar,
    Literal,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

L = TypeVar("L", bound="LeanSettings")


class ConfigError(Exception):
    """A configuration problem; the message names the setting and what is wrong."""


def default_state_dir(component: str) -> Path:
    """Per-user state directory that works on one machine without root."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tickle" / component


def check_http_url(value: str) -> str:
    """An http(s) URL with a host, without its trailing slash; ValueError naming it otherwise."""
    parsed = urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    return value.rstrip("/")


def hostname() -> str:
    """This machine's short host name, usable as a component name."""
    return socket.gethostname().split(".")[0] or "localhost"


# the tickle freshness window's limit and words, on every component that sends or receives tickles
FRESHNESS_MAX_S = 3600
FRESHNESS_DESCRIPTION = "Tickles older or newer than this are stale"
LOG_LEVELS = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
LOG_FORMATS = Literal["text", "json"]
CONFIG_DESCRIPTION = "TOML config file to read"
SECRETS_FILE_DESCRIPTION = (
    "TOML file of the secret settings, read with the config file (which can then be shown and "
    "diffed); relative to the config file's directory"
)


# --- the config file and its secrets file -------------------------------------------------------


def find_config_path(
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


def secrets_path(config: Path, values: dict[str, Any]) -> Path | None:
    """The config file's secrets file, checked: valid TOML, no setting of the config file again."""
    name = values.get("secrets_file")
    if name is None:
        return None
    if not isinstance(name, str) or not name:
        raise ConfigError(f"config: secrets_file in {config} must be a file name")
    path = config.parent / name
    secrets = read_toml(path)
    both = sorted(set(secrets) & (set(values) | {"secrets_file", "config"}))
    if both:
        raise ConfigError(f"config: setting {', '.join(both)} is in both {config} and {path}")
    return path


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config: file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc}") from None


# --- problems in plain words --------------------------------------------------------------------

PLAIN = {
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
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} items",
    "string_pattern_mismatch": "must match {pattern}",
    "string_type": "must be text",
    "list_type": "must be a list",
    "literal_error": "must be {expected}",
    "extra_forbidden": "is not a setting",
    "path_not_file": "is not a file",
    "path_not_directory": "is not a directory",
}


def plain_error(err: Any) -> str:
    """A pydantic error (one item of `ValidationError.errors()`) in plain words, no library
    wording: `must be at least 10`."""
    template = PLAIN.get(err.get("type", ""))
    if template is not None:
        try:
            return template.format(**err.get("ctx", {}))
        except (KeyError, IndexError):
            pass
    return str(err.get("msg", "")).removeprefix("Value error, ").removeprefix("Assertion failed, ")


def secret_name(field: str) -> bool:
    """Settings whose values are secret: tokens, secrets, passwords, database URLs (a password)."""
    return any(word in field for word in ("secret", "token", "password", "database_url"))


def describe_problem(
    field: str, prefix: str, reason: str, value: Any, missing: bool, known: bool = True
) -> str:
    """One problem of a setting as `ConfigError`s say it: its flag and variable (`known`: it is
    a setting), what is wrong, and the value (never a secret's)."""
    top = field.split(".", 1)[0]
    shown = f"setting {field}"
    if known:
        shown += f" (--{top.replace('_', '-')}, {prefix}{top.upper()})"
    if missing:
        return f"{shown}: {reason}"
    if secret_name(field):  # never a secret's value (check-config's lines reach logs)
        return f"{shown}: {reason} (value not shown)"
    return f"{shown}: {reason} (got {value!r})"


# --- check-config -------------------------------------------------------------------------------


def check_config(
    component: str, cls: Any, args: list[str], load: Callable[..., Any] | None = None
) -> int | None:
    """`tickle COMPONENT --check-config FILE`: exit code 0 when FILE (and its secrets file) is a
    valid configuration, else 2 with one line naming the setting; None without the flag.

    Nothing is bound, created or started (deployment tools run it before replacing a config).
    `load`: the settings loader of `cls` (default: `load_settings`, the lean one)."""
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
        (load or load_settings)(cls, [], config=path)
    except ConfigError as exc:
        message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"{prog}: {path}: {message}", file=sys.stderr)
        return 2
    print(f"{path}: a valid {component} configuration")
    return 0


# --- help ---------------------------------------------------------------------------------------


def settings_help(cls: Any, usage: str) -> str:
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


def shown_default(field: Any) -> str:
    """A setting's default as an operator should read it, the same on every machine (`field`: a
    pydantic FieldInfo or a LeanSettings' `SettingField`)."""
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


def _optional_inner(kind: Any) -> Any:
    """`X` of `X | None` (and of `Optional[X]`); `kind` itself otherwise."""
    args = [a for a in get_args(kind) if a is not type(None)]
    if get_origin(kind) in (UnionType, Union) and args:
        return args[0]
    return kind


def _annotation(field: Any) -> Any:
    """The field's type without `| None` and constraints."""
    kind = _optional_inner(field.annotation)
    return get_args(kind)[0] if get_origin(kind) is Annotated else kind


def _metavar(name: str, field: Any) -> str:
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


def _range(field: Any) -> str:
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


# --- the lean settings ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SettingField:
    """One setting of a LeanSettings, described as pydantic's FieldInfo describes one (what
    `settings_help`, `shown_default` and the README's table read)."""

    name: str
    annotation: Any  # its type, `| None` kept, its outer constraints taken off
    kind: Any  # its whole type, constraints on: what values are converted to
    metadata: list[Meta]
    description: str | None
    default: Any
    default_factory: Callable[[], Any] | None

    def is_required(self) -> bool:
        return self.default is msgspec.NODEFAULT and self.default_factory is None

    def get_default(self, call_default_factory: bool = False) -> Any:
        if self.default_factory is not None:
            return self.default_factory() if call_default_factory else None
        return None if self.default is msgspec.NODEFAULT else self.default


def _fields_of(cls: type[LeanSettings]) -> dict[str, SettingField]:
    hints = get_type_hints(cls, include_extras=True)
    fields = {}
    for f in msgspec.structs.fields(cls):
        kind = hints[f.name]
        annotation, metadata = kind, []
        if get_origin(kind) is Annotated:
            annotation, *extras = get_args(kind)
            metadata = [m for m in extras if isinstance(m, Meta)]
        inner = _optional_inner(annotation)
        if inner is not annotation and get_origin(inner) is Annotated:  # `Annotated[...] | None`
            metadata += [m for m in get_args(inner)[1:] if isinstance(m, Meta)]
        factory = None if f.default_factory is msgspec.NODEFAULT else f.default_factory
        description = next((m.description for m in metadata if m.description), None)
        fields[f.name] = SettingField(
            f.name, annotation, kind, metadata, description, f.default, factory
        )
    return fields


class _FieldsOf:
    """`model_fields` of a LeanSettings class: its settings, read from its type hints on first
    use (they resolve once its module has been read)."""

    def __init__(self) -> None:
        self._of: dict[type, dict[str, SettingField]] = {}

    def __get__(self, instance: object, owner: type[LeanSettings]) -> dict[str, SettingField]:
        if owner not in self._of:
            self._of[owner] = _fields_of(owner)
        return self._of[owner]


class LeanSettings(msgspec.Struct, kw_only=True):
    """Base of a component's settings read without pydantic: logging, and the layered sources.

    A subclass names its `env_prefix` in `model_config`, declares its settings as Struct fields
    (limits and description in `msgspec.Meta`) and checks what a type cannot say in
    `check_setting` (one setting) and `check_settings` (across settings)."""

    model_config: ClassVar[dict[str, str]] = {"env_prefix": ""}
    model_fields: ClassVar[dict[str, SettingField]] = _FieldsOf()  # type: ignore[assignment]

    config: Annotated[Path | None, Meta(description=CONFIG_DESCRIPTION)] = None
    secrets_file: Annotated[Path | None, Meta(description=SECRETS_FILE_DESCRIPTION)] = None
    log_level: Annotated[LOG_LEVELS, Meta(description="Log level")] = "INFO"
    log_format: Annotated[LOG_FORMATS, Meta(description="Log line format")] = "text"

    @classmethod
    def model_json_schema(cls) -> dict[str, Any]:
        """The settings' JSON Schema (docs/ARCHITECTURE.md's table reads its properties)."""
        schema: dict[str, Any] = msgspec.json.schema(cls, schema_hook=_path_schema)
        ours: dict[str, Any] = schema["$defs"][cls.__name__]
        for name, field in cls.model_fields.items():  # choices in their order, not sorted
            kind = _annotation(field)
            if get_origin(kind) is Literal and "enum" in ours["properties"][name]:
                ours["properties"][name]["enum"] = list(get_args(kind))
        return ours

    @classmethod
    def before_setting(cls, name: str, value: Any) -> Any:
        """A raw value before it is converted to its type (flags and variables are text)."""
        return value

    @classmethod
    def check_setting(cls, name: str, value: Any, valid: dict[str, Any]) -> Any:
        """One setting's value converted; ValueError says what is wrong with it. `valid`: the
        settings before it that are valid."""
        return value

    def check_settings(self) -> None:
        """Checks across settings, once each is valid (ValueError says what is wrong)."""


def load_settings(cls: type[L], args: list[str] | None = None, **overrides: Any) -> L:
    """Read the component's settings from flags, environment and config file.

    `args` are the component's command-line flags (`--tickle-port 50124`, `--config PATH`).
    Keyword overrides win over everything (tests use them)."""
    fields = cls.model_fields
    prefix = cls.model_config["env_prefix"]
    path = find_config_path(args or [], os.environ.get(f"{prefix}CONFIG"), overrides)
    raw: dict[str, Any] = {}
    if path is not None:
        values = read_toml(path)
        secrets = secrets_path(path, values)
        raw.update(values)
        if secrets is not None:
            raw.update(read_toml(secrets))
    environ = {k.lower(): v for k, v in os.environ.items()}
    for name in fields:
        if (value := environ.get(f"{prefix}{name}".lower())) is not None:
            raw[name] = value
    if args is not None:
        raw.update(_parse_flags(fields, args))
    raw.update(overrides)
    problems = [
        describe_problem(name, prefix, PLAIN["extra_forbidden"], value, False, known=False)
        for name, value in raw.items()
        if name not in fields
    ]
    valid: dict[str, Any] = {}
    for name, field in fields.items():
        missing = name not in raw and field.is_required()
        if missing:
            problems.append(describe_problem(name, prefix, "is required", None, missing=True))
            continue
        value = raw[name] if name in raw else field.get_default(call_default_factory=True)
        try:
            valid[name] = cls.check_setting(name, _converted(cls, field, value), valid)
        except _Problem as exc:
            where = f"{name}.{exc.index}" if exc.index is not None else name
            shown = exc.value if exc.index is not None else value
            problems.append(describe_problem(where, prefix, exc.reason, shown, missing=False))
        except ValueError as exc:
            problems.append(describe_problem(name, prefix, str(exc), value, missing=False))
    if not problems:
        settings = cls(**valid)
        try:
            settings.check_settings()
        except ValueError as exc:
            problems.append(str(exc))
        else:
            return settings
    raise ConfigError("invalid configuration: " + "; ".join(problems))


class _Problem(Exception):
    def __init__(self, reason: str, index: int | None = None, value: Any = None) -> None:
        super().__init__(reason)
        self.reason, self.index, self.value = reason, index, value


_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


def _path_schema(kind: type) -> dict[str, Any]:
    if isinstance(kind, type) and issubclass(kind, Path):
        return {"type": "string", "format": "path"}
    raise NotImplementedError


def _path_hook(kind: type, value: Any) -> Any:
    if isinstance(kind, type) and issubclass(kind, Path) and isinstance(value, str | Path):
        return kind(value)
    raise NotImplementedError


def _converted(cls: type[LeanSettings], field: SettingField, value: Any) -> Any:
    """`value` as the setting's type, within its limits; _Problem in plain words otherwise."""
    value = cls.before_setting(field.name, value)
    if _annotation(field) is bool and isinstance(value, str):
        text = value.strip().lower()
        if text not in _TRUE | _FALSE:
            raise _Problem(PLAIN["bool_parsing"])
        value = text in _TRUE
    if _annotation(field) in (int, float) and isinstance(value, str):
        value = value.strip()  # ` 7 ` is 7, as pydantic reads it
    try:
        return msgspec.convert(value, field.kind, strict=False, dec_hook=_path_hook)
    except msgspec.ValidationError as exc:
        raise _reason(field.kind, value, str(exc)) from None


def _reason(kind: Any, value: Any, message: str) -> _Problem:
    """What is wrong with `value` as a `kind`, in the words of `PLAIN` (msgspec's words when
    none fits)."""
    metas: list[Meta] = []
    if get_origin(kind) is Annotated:
        kind, *extras = get_args(kind)
        metas = [m for m in extras if isinstance(m, Meta)]
    if value is None or _optional_inner(kind) is not kind:
        kind = _optional_inner(kind)
        if get_origin(kind) is Annotated:
            kind, *extras = get_args(kind)
            metas += [m for m in extras if isinstance(m, Meta)]
    many = get_origin(kind) is list  # its items are checked one by one below
    try:
        value = msgspec.convert(value, list if many else kind, strict=False, dec_hook=_path_hook)
    except msgspec.ValidationError:
        return _Problem(_type_words(kind) or message.split(" - at ")[0])
    if many:
        (item,) = get_args(kind)
        for i, each in enumerate(value):
            try:
                msgspec.convert(each, item, strict=False, dec_hook=_path_hook)
            except msgspec.ValidationError as exc:
                return _Problem(_reason(item, each, str(exc)).reason, i, each)
    size = len(value) if isinstance(value, str | list) else 0
    text = isinstance(value, str)
    words = {
        "gt": "greater_than", "ge": "greater_than_equal", "lt": "less_than",
        "le": "less_than_equal", "min_length": "string_too_short" if text else "too_short",
        "max_length": "string_too_long" if text else "too_long",
    }  # fmt: skip
    for meta in metas:
        for key, holds in _BOUNDS.items():
            bound = getattr(meta, key)
            measured = size if key.endswith("_length") else value
            if bound is not None and not holds(measured, bound):
                if isinstance(value, float) and not key.endswith("_length"):
                    bound = float(bound)  # `more than 0.0`, as pydantic words a float's bound
                return _Problem(PLAIN[words[key]].format(**{key: bound}))
        if meta.pattern is not None and text:
            return _Problem(PLAIN["string_pattern_mismatch"].format(pattern=meta.pattern))
    return _Problem(message.split(" - at ")[0])


_BOUNDS: dict[str, Callable[[Any, Any], bool]] = {
    "gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le,
    "min_length": operator.ge, "max_length": operator.le,
}  # fmt: skip


def _type_words(kind: Any) -> str | None:
    if get_origin(kind) is Literal:
        choices = [repr(c) for c in get_args(kind)]
        return "must be " + (", ".join(choices[:-1]) + " or " + choices[-1])
    if get_origin(kind) is list:
        return PLAIN["list_type"]
    words = {int: "int_parsing", float: "float_parsing", bool: "bool_parsing", str: "string_type"}
    return PLAIN[words[kind]] if kind in words else None


def _parse_flags(fields: dict[str, SettingField], args: list[str]) -> dict[str, Any]:
    """The settings the flags give: `--tickle-port 50124`, `--cem` / `--no-cem`. ConfigError for
    an unknown or incomplete flag."""
    parser = argparse.ArgumentParser(
        prog="tickle", add_help=False, allow_abbrev=False, exit_on_error=False
    )
    for name, field in fields.items():
        flag = "--" + name.replace("_", "-")
        if _optional_inner(field.annotation) is bool:
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS
            )
        else:
            parser.add_argument(flag, dest=name, default=argparse.SUPPRESS)
    try:
        known, unknown = parser.parse_known_args(args)
    except argparse.ArgumentError as exc:
        raise ConfigError(str(exc)) from None
    if unknown:
        raise ConfigError(f"unknown options: {' '.join(unknown)}")
    return dict(vars(known))  # a flag given twice: the last one (a list's: JSON or commas)
