"""The operator commands: the NS options go before the command, and an error is one line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import TypeAdapter
from typer.testing import CliRunner

from tests.reliability import record
from tickle import cli
from tickle import console as con

OPERATOR_COMMANDS = [
    ["task", "add", "t1", "--command", "true"],
    ["task", "list"],
    ["job", "add", "j1", "1"],
    ["job", "list"],
    ["run", "pc1", "--task", "1"],
    ["watch", "1"],
    ["timeline", "1"],
    ["computers"],
    ["task-servers"],
    ["about"],
    ["settings", "show"],
    ["settings", "set", "--task-request-interval", "60"],
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
    (["settings", "set", "--task-request-interval", "5"], "greater than or equal to 10"),
    (["run", "pc 1", "--task", "1"], "computers"),
    (["run", "pc1", "--task", "1", "--group", "g" * 65], "groups"),
    (["task", "add", "t1", "--command", "true", "--timeout", "-1"], "timeout_s"),
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
            "interval, bad computer and group names, a negative timeout",
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
