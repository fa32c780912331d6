"""The agent's settings, read without pydantic (tickle.settingsbase): lists from flags, variables
and the config file, and each bad value named on one line in plain words."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tickle.agent.settings import AgentSettings
from tickle.settingsbase import ConfigError, load_settings

BASE = ["--enrollment-secret", "s3cret", "--task-servers", "http://127.0.0.1:1"]


def test_lists_come_as_json_or_commas_from_flags_variables_and_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = load_settings(AgentSettings, [*BASE, "--groups", "web, eu-1"])
    assert s.groups == ["web", "eu-1"]
    s = load_settings(AgentSettings, [*BASE, "--groups", "web", "--groups", "db,ops"])
    assert s.groups == ["db", "ops"]  # the last flag, as for any setting
    monkeypatch.setenv("TICKLE_AGENT_GROUPS", '["a", "b"]')
    monkeypatch.setenv("tickle_agent_task_servers", "http://127.0.0.1:2/, http://127.0.0.1:3")
    s = load_settings(AgentSettings, ["--enrollment-secret", "s3cret"])
    assert (s.groups, s.task_servers) == (["a", "b"], ["http://127.0.0.1:2", "http://127.0.0.1:3"])
    conf = tmp_path / "agent.toml"
    conf.write_text('groups = ["c"]\ncem = true\ntickle_port = 50200\n')
    s = load_settings(AgentSettings, ["--config", str(conf), "--enrollment-secret", "s3cret"])
    assert (s.groups, s.cem, s.tickle_port) == (["a", "b"], True, 50200)  # the variable wins
    assert s.control_socket == s.state_dir / "agent.sock"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--groups", "web,-b"], "setting groups.1 (--groups, TICKLE_AGENT_GROUPS): must match "
         "^[A-Za-z0-9][A-Za-z0-9._-]*$ (got '-b')"),
        (["--groups", "[1"], "setting groups (--groups, TICKLE_AGENT_GROUPS): must be a list "
         "(got '[1')"),
        (["--task-servers", ""], "setting task_servers (--task-servers, "
         "TICKLE_AGENT_TASK_SERVERS): must have at least 1 item(s) (got '')"),
        (["--task-umask", "0999"], "setting task_umask (--task-umask, TICKLE_AGENT_TASK_UMASK): "
         "must match ^0?[0-7]{3}$ (got '0999')"),
        (["--enrollment-secret", " "], "setting enrollment_secret (--enrollment-secret, "
         "TICKLE_AGENT_ENROLLMENT_SECRET): is required: set --enrollment-secret, "
         "TICKLE_AGENT_ENROLLMENT_SECRET or enrollment_secret in the config file (value not "
         "shown)"),
        (["--ca-file", "/nonexistent/ca.pem"], "setting ca_file (--ca-file, TICKLE_AGENT_CA_FILE): "
         "is not a file (got '/nonexistent/ca.pem')"),
        (["--advertise-port", "0"], "setting advertise_port (--advertise-port, "
         "TICKLE_AGENT_ADVERTISE_PORT): must be at least 1 (got '0')"),
        (["--freshness-window-s", "0"], "setting freshness_window_s (--freshness-window-s, "
         "TICKLE_AGENT_FRESHNESS_WINDOW_S): must be more than 0.0 (got '0')"),
        (["--log-level", "LOUD"], "setting log_level (--log-level, TICKLE_AGENT_LOG_LEVEL): must "
         "be 'DEBUG', 'INFO', 'WARNING' or 'ERROR' (got 'LOUD')"),
    ],
)  # fmt: skip
def test_a_bad_setting_is_named_with_its_flag_and_variable(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(AgentSettings, [*BASE, *flags])
    assert str(caught.value) == f"invalid configuration: {message}"


def test_the_agent_command_says_what_is_wrong_on_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text("tickle_port = 0\nbogus = 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "tickle", "agent", "--check-config", str(conf)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "setting bogus: is not a setting (got 1)" in result.stderr
    assert (
        "setting tickle_port (--tickle-port, TICKLE_AGENT_TICKLE_PORT): must be at least 1 (got 0)"
        in result.stderr
    )
    assert "Traceback" not in result.stderr
