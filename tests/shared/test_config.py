"""Settings come from flags, environment and a TOML file, and bad values name the setting."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar

import pytest
from msgspec import Meta
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tickle.config import ComponentSettings, ConfigError, load_settings, read_or_create_secret
from tickle.settingsbase import LeanSettings
from tickle.taskserver.settings import TaskServerSettings


class DemoSettings(ComponentSettings):
    model_config = SettingsConfigDict(
        env_prefix="TICKLE_DEMO_", extra="forbid", validate_default=True
    )
    api_port: int = Field(default=50120, ge=1, le=65535)
    api_host: str = "127.0.0.1"
    cem: bool = False


class LeanDemoSettings(LeanSettings, kw_only=True):
    """The same settings read without pydantic (the agent's kind, tickle.settingsbase)."""

    model_config: ClassVar[dict[str, str]] = {"env_prefix": "TICKLE_DEMO_"}
    api_port: Annotated[int, Meta(ge=1, le=65535)] = 50120
    api_host: str = "127.0.0.1"
    cem: bool = False


Settings = type[DemoSettings] | type[LeanDemoSettings]


@pytest.fixture(params=[DemoSettings, LeanDemoSettings], ids=["pydantic", "lean"])
def demo(request: pytest.FixtureRequest) -> Settings:
    """Each test of the sources and their messages runs on both kinds of settings."""
    kind: Settings = request.param
    return kind


def test_defaults_work_without_any_source(demo: Settings) -> None:
    s = load_settings(demo, [])
    assert (s.api_host, s.api_port, s.cem) == ("127.0.0.1", 50120, False)


def test_flag_beats_environment_beats_file(
    demo: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('api_port = 1111\napi_host = "127.0.0.9"\n')
    monkeypatch.setenv("TICKLE_DEMO_API_PORT", "2222")
    s = load_settings(demo, ["--config", str(conf)])
    assert (s.api_port, s.api_host) == (2222, "127.0.0.9")
    s = load_settings(demo, ["--config", str(conf), "--api-port", "3333", "--cem"])
    assert (s.api_port, s.cem) == (3333, True)


def test_config_file_from_environment(
    demo: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("api_port = 4444\n")
    monkeypatch.setenv("TICKLE_DEMO_CONFIG", str(conf))
    assert load_settings(demo, []).api_port == 4444


def test_bad_environment_value_names_setting_and_variable(
    demo: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TICKLE_DEMO_API_PORT", "abc")
    with pytest.raises(
        ConfigError, match=r"api_port \(--api-port, TICKLE_DEMO_API_PORT\): must be a whole number"
    ):
        load_settings(demo, [])


def test_out_of_range_flag_names_the_setting(demo: Settings) -> None:
    with pytest.raises(ConfigError, match="api_port"):
        load_settings(demo, ["--api-port", "70000"])


def test_unknown_flag_is_named(demo: Settings) -> None:
    with pytest.raises(ConfigError, match="--bogus"):
        load_settings(demo, ["--bogus", "1"])


def test_unknown_key_in_file_is_named(demo: Settings, tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("api_prot = 1\n")
    with pytest.raises(ConfigError, match="api_prot"):
        load_settings(demo, ["--config", str(conf)])


def test_broken_toml_and_missing_file_are_named(demo: Settings, tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("api_port = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(demo, ["--config", str(conf)])
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(demo, ["--config", str(tmp_path / "missing.toml")])


def test_secret_is_created_once_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "d" / "admin-token"
    first = read_or_create_secret(path)
    assert len(first) >= 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_or_create_secret(path) == first


def test_secrets_file_named_by_the_config_file_is_read(demo: Settings, tmp_path: Path) -> None:
    # the secrets live in a file of their own, so the config file can be shown and diffed
    secrets = tmp_path / "c.secrets.toml"
    secrets.write_text('api_host = "127.0.0.7"\n')
    conf = tmp_path / "c.toml"
    conf.write_text(f"api_port = 1111\nsecrets_file = {str(secrets)!r}\n")
    s = load_settings(demo, ["--config", str(conf)])
    assert (s.api_port, s.api_host) == (1111, "127.0.0.7")


def test_secrets_file_relative_to_the_config_file(demo: Settings, tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text('api_host = "127.0.0.8"\n')
    conf = tmp_path / "c.toml"
    conf.write_text('secrets_file = "s.toml"\n')
    assert load_settings(demo, ["--config", str(conf)]).api_host == "127.0.0.8"


def test_setting_in_both_files_is_refused_by_name(demo: Settings, tmp_path: Path) -> None:
    secrets = tmp_path / "s.toml"
    secrets.write_text("api_port = 2\n")
    conf = tmp_path / "c.toml"
    conf.write_text(f"api_port = 1\nsecrets_file = {str(secrets)!r}\n")
    with pytest.raises(ConfigError, match=r"api_port.*both"):
        load_settings(demo, ["--config", str(conf)])


def test_bad_or_missing_secrets_file_is_named(demo: Settings, tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('secrets_file = "missing.toml"\n')
    with pytest.raises(ConfigError, match=r"missing\.toml does not exist"):
        load_settings(demo, ["--config", str(conf)])
    (tmp_path / "bad.toml").write_text("x = = 1\n")
    conf.write_text('secrets_file = "bad.toml"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml is not valid TOML"):
        load_settings(demo, ["--config", str(conf)])


class SecretDemoSettings(DemoSettings):
    enrollment_secret: str = Field(default="x" * 20, min_length=16)


def test_a_bad_secret_is_named_but_never_shown(tmp_path: Path) -> None:
    # check-config's message reaches deployment logs: it names the setting, not its value
    (tmp_path / "s.toml").write_text('enrollment_secret = "sekrit"\n')
    conf = tmp_path / "c.toml"
    conf.write_text('secrets_file = "s.toml"\n')
    with pytest.raises(ConfigError, match="enrollment_secret") as caught:
        load_settings(SecretDemoSettings, ["--config", str(conf)])
    assert "sekrit" not in str(caught.value)


def test_a_task_server_tickle_window_below_one_is_named_on_one_line(tmp_path: Path) -> None:
    good = {"name": "ts1", "ns_url": "http://127.0.0.1:9", "state_dir": tmp_path,
            "enrollment_secret": "s" * 24, "agent_enrollment_secret": "g" * 24}  # fmt: skip
    assert load_settings(TaskServerSettings, [], **good).agent_tickle_window == 512
    with pytest.raises(ConfigError) as err:
        load_settings(TaskServerSettings, ["--agent-tickle-window", "0"], **good)
    assert str(err.value) == (
        "invalid configuration: setting agent_tickle_window (--agent-tickle-window, "
        "TICKLE_TS_AGENT_TICKLE_WINDOW): must be at least 1 (got '0')"
    )


class ParityPydantic(ComponentSettings):
    model_config = SettingsConfigDict(env_prefix="TICKLE_P_", extra="forbid", validate_default=True)
    api_port: int = Field(default=50120, ge=1, le=65535)
    ratio: float = Field(default=0.5, gt=0, le=1)
    label: str = Field(default="a", min_length=1, max_length=8, pattern=r"^[a-z]+$")
    other_port: int | None = Field(default=None, ge=1, le=65535)
    flag: bool = False
    where: Path | None = None
    note: str | None = None


class ParityLean(LeanSettings, kw_only=True):
    model_config: ClassVar[dict[str, str]] = {"env_prefix": "TICKLE_P_"}
    api_port: Annotated[int, Meta(ge=1, le=65535)] = 50120
    ratio: Annotated[float, Meta(gt=0, le=1)] = 0.5
    label: Annotated[str, Meta(min_length=1, max_length=8, pattern=r"^[a-z]+$")] = "a"
    other_port: Annotated[int, Meta(ge=1, le=65535)] | None = None
    flag: bool = False
    where: Path | None = None
    note: str | None = None


PARITY = [
    ["--api-port", "0"], ["--api-port", "x"], ["--api-port", "1.5"], ["--api-port", "70000"],
    ["--ratio", "0"], ["--ratio", "abc"], ["--ratio", "1.5"], ["--label", "-x"], ["--label", ""],
    ["--label", "abcdefghi"], ["--other-port", "0"], ["--log-level", "LOUD"],
    ["--log-format", "xml"], ["--bogus", "1"], ["--flag", "maybe"], ["--api-port"],
    ["--api-port", "0", "--ratio", "2", "--label", "B"], ["--flag", "--no-flag", "--note", "n"],
    ["--where", "/tmp/x", "--other-port", "8", "--api-port=9", "--ratio=0.25"],
]  # fmt: skip


def _outcome(cls: Settings, args: list[str], **overrides: object) -> object:
    try:
        s = load_settings(cls, args, **overrides)
    except ConfigError as exc:
        return str(exc)
    return {name: getattr(s, name) for name in ParityLean.model_fields}


@pytest.mark.parametrize("args", PARITY, ids=" ".join)
def test_lean_settings_read_flags_as_pydantic_settings_do(args: list[str]) -> None:
    assert _outcome(ParityLean, args) == _outcome(ParityPydantic, args)


@pytest.mark.parametrize(
    ("variable", "value"),
    [("FLAG", "yes"), ("FLAG", "off"), ("FLAG", "maybe"), ("API_PORT", " 7 "), ("api_port", "8"),
     ("RATIO", ""), ("OTHER_PORT", "99999"), ("LOG_LEVEL", "DEBUG"), ("WHERE", "/x")],
)  # fmt: skip
def test_lean_settings_read_variables_as_pydantic_settings_do(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(f"TICKLE_P_{variable}", value)
    assert _outcome(ParityLean, []) == _outcome(ParityPydantic, [])


@pytest.mark.parametrize(
    "toml",
    ["api_port = 1.5", "api_port = 2.0", 'api_port = "7"', "label = 5", "flag = 1",
     "other_port = 0", "ratio = 1", "unknown = 1", 'note = "x"\nlabel = "Q"'],
)  # fmt: skip
def test_lean_settings_read_a_config_file_as_pydantic_settings_do(
    tmp_path: Path, toml: str
) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(toml + "\n")
    args = ["--config", str(conf)]
    assert _outcome(ParityLean, args) == _outcome(ParityPydantic, args)
