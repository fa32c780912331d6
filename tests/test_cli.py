"""The operator commands: the NS options go before the command, and an error is one line."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import TypeAdapter
from typer.testing import CliRunner

from tests.reliability import record
from tickle import cli
from tickle import console as con
from tickle.__main__ import _agent_run_flags

OPERATOR_COMMANDS = [
    ["task", "add", "t1", "--command", "true"],
    ["task", "list"],
    ["job", "add", "j1", "1"],
    ["job", "list"],
    ["run", "pc1", "--task", "1"],
    ["watch", "1"],
    ["timeline", "1"],
    ["computers"],
    ["computers", "--json"],
    ["computers", "pending"],
    ["computers", "approve", "pc1"],
    ["computers", "reject", "pc1"],
    ["computers", "rekey", "pc1"],
    ["task-servers"],
    ["task-servers", "pending", "--json"],
    ["task-servers", "approve", "ts1"],
    ["task-servers", "reject", "ts1"],
    ["task-servers", "rekey", "ts1"],
    ["about"],
    ["settings", "show"],
    ["settings", "set", "--task-request-interval", "60"],
    ["operators", "add", "alice"],
    ["operators", "list"],
    ["audit", "--who", "alice"],
]
NS_ENV = ("TICKLE_NS_URL", "TICKLE_ADMIN_TOKEN", "TICKLE_ADMIN_TOKEN_FILE", "TICKLE_CA_FILE")
Target = tuple[str, str, Path | None]


@pytest.fixture
def reached(monkeypatch: pytest.MonkeyPatch) -> list[Target]:
    """Where the commands sent their NS client: (url, token, CA file); every NS is unreachable."""
    for name in NS_ENV:
        monkeypatch.delenv(name, raising=False)
    seen: list[Target] = []

    class UnreachableNs:
        def __init__(self, url: str, token: str, ca_file: Path | None = None) -> None:
            seen.append((url, token, ca_file))
            self.url = url

        async def __aenter__(self) -> UnreachableNs:
            raise con.ConsoleError(f"cannot reach the NS at {self.url}")

        async def __aexit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(con, "NsClient", UnreachableNs)
    return seen


@pytest.mark.parametrize("command", OPERATOR_COMMANDS, ids=" ".join)
def test_ns_options_before_the_command_reach_every_operator_command(
    reached: list[Target], command: list[str]
) -> None:
    url = "https://ns.example:50120"
    options = ["--ns-url", url, "--admin-token", "t0ken", "--ca-file", "/etc/tickle/ca.pem"]

    result = CliRunner().invoke(cli.app, [*options, *command])

    assert reached == [(url, "t0ken", Path("/etc/tickle/ca.pem"))]
    assert result.exit_code == 1
    assert result.output == f"tickle: cannot reach the NS at {url}\n"


def test_environment_sets_the_ns_target(reached: list[Target], tmp_path: Path) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text("from-the-file\n")
    env = {
        "TICKLE_NS_URL": "https://ns.example:50120",
        "TICKLE_ADMIN_TOKEN_FILE": str(token_file),
        "TICKLE_CA_FILE": "/etc/tickle/ca.pem",
    }

    result = CliRunner().invoke(cli.app, ["about"], env=env)

    assert result.exit_code == 1
    assert reached == [("https://ns.example:50120", "from-the-file", Path("/etc/tickle/ca.pem"))]


def test_an_ns_option_after_the_command_says_it_goes_before(reached: list[Target]) -> None:
    result = CliRunner().invoke(cli.app, ["task", "list", "--ns-url", "https://ns.example:50120"])

    assert result.exit_code == 2
    assert "--ns-url goes before the command: tickle --ns-url ... task ..." in result.output
    assert reached == []


def test_a_missing_admin_token_is_one_line_naming_the_file(
    reached: list[Target], tmp_path: Path
) -> None:
    missing = tmp_path / "a-directory-with-a-long-name-so-the-message-passes-80-columns" / "token"

    result = CliRunner().invoke(cli.app, ["--admin-token-file", str(missing), "computers"])

    assert result.exit_code == 1
    assert result.output.startswith("tickle: no admin token: ")
    assert str(missing) in result.output
    assert result.output.count("\n") == 1
    assert reached == []


def test_an_invalid_setting_is_one_line_naming_the_field(reached: list[Target]) -> None:
    result = CliRunner().invoke(cli.app, ["settings", "set", "--task-request-interval", "0"])

    assert result.exit_code == 2
    assert result.output.startswith("tickle settings set: task_request_interval_s: ")
    assert result.output.count("\n") == 1
    assert reached == []


def test_the_components_take_their_own_ns_url_after_the_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `tickle task-server --ns-url` is the task server's setting, not the operator's NS option
    argv: list[list[str]] = []
    monkeypatch.setattr("tickle.taskserver.service.main", lambda args: argv.append(args) or 0)

    result = CliRunner().invoke(cli.app, ["task-server", "--ns-url", "http://10.0.0.1:50120"])

    assert result.exit_code == 0, result.output
    assert argv == [["--ns-url", "http://10.0.0.1:50120"]]


# --- bad operator input: one line, exit 2, and the NS is never reached ---------------------------

BAD_INPUT = [
    # (command line, what the one line must name)
    (["job", "add", "j1", *map(str, range(1, 61))], "at most 50"),
    (["job", "add", "no spaces", "1"], "name"),
    (["settings", "set"], "nothing to change"),
    (
        ["settings", "set", "--task-request-interval", "5"],
        "task_request_interval_s: must be at least 10",
    ),
    (["settings", "set", "--long-poll-timeout", "2"], "long_poll_timeout_s"),
    (["run", "pc 1", "--task", "1"], "computers"),
    (["run", "pc1", "--task", "1", "--group", "g" * 65], "groups"),
    (["task", "add", "t1", "--command", "true", "--timeout", "-1"], "timeout_s"),
    (["computers", "approve", "pc 1"], "name 'pc 1'"),
    (["task-servers", "rekey", "ts/1"], "name 'ts/1'"),
    (["runs", "list", "--status", "done"], "--status: 'done' is not one of pending"),
    (["runs", "list", "--until", "noon"], "--until: 'noon' is neither ISO 8601"),
    (["history", "--computer", "pc1", "--status", "ok"], "--status: 'ok' is not one of"),
    (["computers", "--offline", "--online"], "at most one of --offline or --online"),
    (["run", "pc1", "--task", "1", "--expires-in", "soon"], "not a duration like 90s"),
    (["run", "pc1", "--task", "1", "--expires-in", "0h"], "must be more than 0"),
    (["run", "pc1", "--task", "1", "--expires-in", "400d"], "expires_in_s"),
    (["run", "pc1", "--task", "1", "--failed"], "--failed goes with --rerun"),
    (["run", "--rerun", "3", "--task", "1"], "--rerun takes the run's task or job"),
    (["run", "--task", "1"], "give at least one computer or group, or all_computers"),
    (["operators", "add", "bad name!"], "name"),
]
_bad_input: list[str] = []


@pytest.fixture(scope="module")
def bad_input_results() -> Iterator[list[str]]:
    yield _bad_input
    if _bad_input:
        failed = [o for o in _bad_input if o != "ok"]
        record(
            case="CLI: bad operator input",
            done="job add with 60 task ids, a bad job name, settings set with no flag, a 5 s "
            "interval, a 2 s long-poll timeout, bad computer and group names, a negative timeout, an unknown status, a "
            "time that is no time, both --offline and --online, bad expiries, --failed without "
            "--rerun, --rerun with a task, run without targets",
            outcome="; ".join(failed)
            or "exit 2, one line naming the limit or field, NS not reached",
            tried=len(_bad_input),
            command="pytest tests/test_cli.py -k bad_operator_input",
        )


@pytest.mark.attacks
@pytest.mark.parametrize(
    ("command", "named"), BAD_INPUT, ids=[" ".join(c)[:40] for c, _ in BAD_INPUT]
)
def test_bad_operator_input_is_one_line_and_never_reaches_the_ns(
    reached: list[Target], bad_input_results: list[str], command: list[str], named: str
) -> None:
    result = CliRunner().invoke(cli.app, command)

    ok = (
        result.exit_code == 2
        and named in result.output
        and result.output.count("\n") == 1
        and reached == []
    )
    bad_input_results.append("ok" if ok else f"{' '.join(command)[:30]}: exit {result.exit_code}")
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2, result.output
    assert named in result.output
    assert result.output.count("\n") == 1, result.output
    assert reached == [], "bad input must be refused before the NS is called"


@pytest.mark.attacks
def test_an_answer_the_cli_cannot_read_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # an NS of another version (or not an NS at all) answers 200 with a body of another shape
    async def request(*_args: object, answer: object = None, **_kw: object) -> object:
        return TypeAdapter(answer).validate_json('{"version": "two"}')

    monkeypatch.setattr(con.http, "request", request)
    result = CliRunner().invoke(cli.app, ["--admin-token", "t0ken", "settings", "show"])

    ok = result.exit_code == 1 and result.output.count("\n") == 1
    record(
        case="CLI: unreadable answer from the NS",
        done="settings show against a server answering 200 with a body of another shape",
        outcome="exit 1, one line naming the route" if ok else f"exit {result.exit_code}",
        tried=1,
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1, result.output
    assert result.output.startswith("tickle: GET /api/settings: "), result.output
    assert result.output.count("\n") == 1, result.output


def _render(table: object) -> str:
    from rich.console import Console

    out = Console(record=True, width=240)
    out.print(table)
    return out.export_text()


def test_computers_and_task_servers_show_their_clock() -> None:
    from tickle.messages import ComputerOut, TaskServerOut

    ahead = ComputerOut(
        name="pc1", task_server="ts1", tickle_state="clock_skewed", cem=False, groups=[],
        reported_address=None, observed_address=None, nat_detected=False, last_contact_at=None,
        clock_offset_s=60.04,
    )  # fmt: skip
    ts = TaskServerOut(
        name="ts1", tickle_host="h", tickle_port=1, api_url="u", tickle_state="reachable",
        last_pull_at=None, clients=1, clock_offset_s=-0.01,
    )  # fmt: skip
    computers = _render(con.computers_table([ahead]))
    assert "clock_skewed" in computers
    assert "+60.0s" in computers
    assert "±0.0s" in _render(con.task_servers_table([ts]))


def test_a_corrected_timeline_says_so() -> None:
    from tickle.messages import ExecutionOut, TimelineStep

    steps = [TimelineStep(step=s, at=100.0) for s in ("created", "recorded")] + [
        TimelineStep(step=s, at=100.5, corrected=True, clock_offset_s=60.0)
        for s in ("started", "finished")
    ]
    execution = ExecutionOut(
        id=1, run_id=1, computer="pc1", task_server="ts1", status="succeeded", timeline=steps
    )
    text = _render(con.timeline_table(execution))
    assert "* started, finished: timed by a clock 60.0s ahead of the NS's" in text
    assert "00:01:40.500 *" in text
    plain = ExecutionOut(
        id=2, run_id=1, computer="pc2", task_server="ts1", status="succeeded", timeline=steps[:2]
    )
    assert con.timeline_note(plain) is None


@pytest.mark.parametrize("component", [["agent", "run"], ["task-server"], ["ns"]], ids=" ".join)
def test_a_component_help_prints_its_flags_and_exits_0(component: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tickle", *component, "--help"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "--state-dir" in done.stdout
    assert "bad command-line flags" not in done.stderr


COMPONENTS = [("ns", "notification-server"), ("task-server", "task-server"), ("agent", "agent")]


@pytest.mark.parametrize(("command", "name"), COMPONENTS)
def test_check_config_names_the_bad_setting_in_one_line(
    command: str, name: str, tmp_path: Path
) -> None:
    # Ansible's `validate:` runs this on every config file before it replaces the old one
    conf = tmp_path / "c.toml"
    conf.write_text(
        f'api_port = 70000\ntickle_port = 70000\nenrollment_secret = "{"s" * 20}"\n'
        f'state_dir = "{tmp_path}"\ntask_servers = ["https://ts.example:50121"]\n'
    )
    args = [command, "run"] if command == "agent" else [command]
    result = CliRunner().invoke(cli.app, [*args, "--check-config", str(conf)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert str(conf) in lines[0]
    assert "tickle_port" in lines[0] or "api_port" in lines[0], lines[0]


def test_check_config_accepts_a_good_file_and_changes_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    secrets = tmp_path / "c.secrets.toml"
    secrets.write_text(f'enrollment_secret = "{"s" * 20}"\n')
    conf = tmp_path / "c.toml"
    conf.write_text(
        f'task_servers = ["https://ts.example:50121"]\nstate_dir = "{state}"\n'
        'secrets_file = "c.secrets.toml"\n'
    )
    result = CliRunner().invoke(cli.app, ["agent", "--check-config", str(conf)])
    assert result.exit_code == 0, result.output
    assert not state.exists()


def test_check_config_of_a_missing_file_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli.app, ["ns", "--check-config", str(tmp_path / "none.toml")])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert "does not exist" in result.output


@pytest.mark.parametrize(
    ("args", "flags"),
    [
        (["agent"], []),
        (["agent", "run", "--name", "pc1"], ["--name", "pc1"]),
        (["agent", "--name", "pc1"], ["--name", "pc1"]),
        (["agent", "status"], None),
        (["agent", "check-now", "--state-dir", "x"], None),
        (["agent", "--help"], None),
        (["agent", "run", "-h"], None),
        (["ns", "--name", "x"], None),
        ([], None),
    ],
)
def test_only_running_the_agent_skips_the_cli(args: list[str], flags: list[str] | None) -> None:
    assert _agent_run_flags(args) == flags


def test_the_running_agent_never_loads_the_operators_cli() -> None:
    """The CLI's libraries would stay in the agent's memory as long as it runs (S7)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "tickle", "agent", "--no-such-flag"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "tickle.agent.start" in imported  # the agent's own entry, which reads its flags
    assert not imported & {"typer", "rich", "click", "tickle.cli", "tickle.console"}
    assert "no-such-flag" in done.stderr
