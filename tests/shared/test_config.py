"""Settings come from flags, environment and a TOML file, and bad values name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tickle.config import ComponentSettings, ConfigError, load_settings, read_or_create_secret
from tickle.taskserver.settings import TaskServerSettings


class DemoSettings(ComponentSettings):
    model_config = SettingsConfigDict(
        env_prefix="TICKLE_DEMO_", extra="forbid", validate_default=True
    )
    api_port: int = Field(default=50120, ge=1, le=65535)
    api_host: str = "127.0.0.1"
    cem: bool = False


def test_defaults_work_without_any_source() -> None:
    s = load_settings(DemoSettings, [])
    assert (s.api_host, s.api_port, s.cem) == ("127.0.0.1", 50120, False)


def test_flag_beats_environment_beats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('api_port = 1111\napi_host = "127.0.0.9"\n')
    monkeypatch.setenv("TICKLE_DEMO_API_PORT", "2222")
    s = load_settings(DemoSettings, ["--config", str(conf)])
    assert (s.api_port, s.api_host) == (2222, "127.0.0.9")
    s = load_settings(DemoSettings, ["--config", str(conf), "--api-port", "3333", "--cem"])
    assert (s.api_port, s.cem) == (3333, True)


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("api_port = 4444\n")
    monkeypatch.setenv("TICKLE_DEMO_CONFIG", str(conf))
    assert load_settings(DemoSettings, []).api_port == 4444


def test_bad_environment_value_names_setting_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TICKLE_DEMO_API_PORT", "abc")
    with pytest.raises(
        ConfigError, match=r"api_port \(--api-port, TICKLE_DEMO_API_PORT\): must be a whole number"
    ):
        load_settings(DemoSettings, [])


def test_out_of_range_flag_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="api_port"):
        load_settings(DemoSettings, ["--api-port", "70000"])


def test_unknown_flag_is_named() -> None:
    with pytest.raises(ConfigError, match="--bogus"):
        load_settings(DemoSettings, ["--bogus", "1"])


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("api_prot = 1\n")
    with pytest.raises(ConfigError, match="api_prot"):
        load_settings(DemoSettings, ["--config", str(conf)])


def test_broken_toml_and_missing_file_are_named(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("api_port = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(DemoSettings, ["--config", str(conf)])
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(DemoSettings, ["--config", str(tmp_path / "missing.toml")])


def test_secret_is_created_once_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "d" / "admin-token"
    first = read_or_create_secret(path)
    assert len(first) >= 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_or_create_secret(path) == first


def test_secrets_file_named_by_the_config_file_is_read(tmp_path: Path) -> None:
    # the secrets live in a file of their own, so the config file can be shown and diffed
    secrets = tmp_path / "c.secrets.toml"
    secrets.write_text('api_host = "127.0.0.7"\n')
    conf = tmp_path / "c.toml"
    conf.write_text(f"api_port = 1111\nsecrets_file = {str(secrets)!r}\n")
    s = load_settings(DemoSettings, ["--config", str(conf)])
    assert (s.api_port, s.api_host) == (1111, "127.0.0.7")


def test_secrets_file_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text('api_host = "127.0.0.8"\n')
    conf = tmp_path / "c.toml"
    conf.write_text('secrets_file = "s.toml"\n')
    assert load_settings(DemoSettings, ["--config", str(conf)]).api_host == "127.0.0.8"


def test_setting_in_both_files_is_refused_by_name(tmp_path: Path) -> None:
    secrets = tmp_path / "s.toml"
    secrets.write_text("api_port = 2\n")
    conf = tmp_path / "c.toml"
    conf.write_text(f"api_port = 1\nsecrets_file = {str(secrets)!r}\n")
    with pytest.raises(ConfigError, match=r"api_port.*both"):
        load_settings(DemoSettings, ["--config", str(conf)])


def test_bad_or_missing_secrets_file_is_named(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('secrets_file = "missing.toml"\n')
    with pytest.raises(ConfigError, match=r"missing\.toml does not exist"):
        load_settings(DemoSettings, ["--config", str(conf)])
    (tmp_path / "bad.toml").write_text("x = = 1\n")
    conf.write_text('secrets_file = "bad.toml"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml is not valid TOML"):
        load_settings(DemoSettings, ["--config", str(conf)])


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
