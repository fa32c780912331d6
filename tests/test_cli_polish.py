"""The CLI as documentation and as a tool: every --help exits 0 and reads as documentation,
errors are one plain line, --json on every listing with ISO 8601 times, tables fit 100 columns."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import re
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

import tickle
from tests.agent.conftest import StubAgent
from tests.reliability import record
from tickle import cli, clock
from tickle import console as con
from tickle.agent.control import ControlServer
from tickle.messages import (
    TIMELINE_STEPS,
    About,
    AuditEventOut,
    ComputerOut,
    ExecutionOut,
    ExecutionsPage,
    JobOut,
    OperatorOut,
    RegistrationOut,
    RunOut,
    RunsPage,
    RunSummary,
    SettingsOut,
    StepResult,
    TaskOut,
    TaskServerOut,
    TimelineStep,
)

# what a help text must never show: Python types, pydantic's and argparse's internals
LEAKS = [
    "SecretStr", "{Path,null}", "null", "default factory", "<lambda>", "list[str]", "<int>",
    "<str>", "<float>", "<path>", "NoneType", "None]", "str |", "| None", "Annotated",
]  # fmt: skip
COMPONENTS = {
    ("ns",): "tickle.ns.settings:NsSettings",
    ("task-server",): "tickle.taskserver.settings:TaskServerSettings",
    ("agent", "run"): "tickle.agent.settings:AgentSettings",
}


def _command_paths() -> Iterator[tuple[str, ...]]:
    """Every command and group of `tickle`, as the words that name it."""

    def walk(command: Any, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        yield path
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, (*path, name))

    yield from walk(typer.main.get_command(cli.app), ())


ALL_COMMANDS = list(_command_paths())


def test_the_walk_finds_every_command() -> None:
    names = {" ".join(p) for p in ALL_COMMANDS}
    for expected in ("", "run", "agent run", "agent status", "ns", "task-server", "task list",
                     "computers approve", "task-servers delete", "runs list", "settings set"):  # fmt: skip
        assert expected in names


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=lambda p: " ".join(p) or "tickle")
def test_every_help_exits_0_and_reads_as_documentation(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli.app, [*path, "--help"], prog_name="tickle")

    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: tickle"), result.output
    for leak in LEAKS:
        assert leak not in result.output, f"{leak!r} in the help of {' '.join(path)}"


def test_every_option_and_argument_says_what_it_is() -> None:
    missing = []

    def walk(command: Any, path: tuple[str, ...]) -> None:
        missing.extend(f"{' '.join(path)} {p.name}" for p in command.params if not p.help)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, (*path, name))

    walk(typer.main.get_command(cli.app), ("tickle",))
    assert missing == []


@pytest.mark.parametrize("path", list(COMPONENTS), ids=" ".join)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_a_component_help_documents_every_setting(path: tuple[str, ...], flag: str) -> None:
    module, name = COMPONENTS[path].split(":")
    settings = getattr(importlib.import_module(module), name)

    result = CliRunner().invoke(cli.app, [*path, flag], prog_name="tickle")

    assert result.exit_code == 0, result.output
    text = re.sub(r"\s+", " ", result.output)
    assert "bad command-line flags" not in text
    for setting, field in settings.model_fields.items():
        flag_name = "--" + setting.replace("_", "-")
        entry = text[text.index(f" {flag_name} ") :]
        entry = entry[: entry.index("]") + 1]
        assert "default: " in entry, entry
        assert f"env: {settings.model_config['env_prefix']}{setting.upper()}" in entry, entry
        constrained = any(
            getattr(m, k, None) is not None for m in field.metadata for k in ("ge", "gt", "le")
        )
        assert ("range: " in entry) == constrained, entry


def test_the_agent_group_help_lists_its_commands() -> None:
    result = CliRunner().invoke(cli.app, ["agent", "--help"], prog_name="tickle")

    assert result.exit_code == 0, result.output
    for command in ("run", "check-now", "policy-refresh", "status"):
        assert f"  {command} " in result.output


def test_version_prints_the_package_version() -> None:
    result = CliRunner().invoke(cli.app, ["--version"], prog_name="tickle")

    assert result.exit_code == 0
    assert result.output == f"tickle {importlib.metadata.version('tickle')}\n"
    # one source of the version: the installed metadata is built from tickle.__version__
    assert importlib.metadata.version("tickle") == tickle.__version__


# --- errors: one line, naming what is wrong, no library wording or links -------------------------

LIBRARY_WORDS = ["pydantic", "errors.pydantic.dev", "Input should", "Value error", "Traceback",
                 "For further information", "Usage:", "Try '"]  # fmt: skip
BAD_FLAGS = [
    # (command line, what the one line must name)
    (["ns", "--api-port", "abc"], "api_port (--api-port, TICKLE_NS_API_PORT): must be a whole"),
    (["ns", "--api-port", "70000"], "api_port (--api-port, TICKLE_NS_API_PORT): must be at most"),
    (["ns", "--log-level", "LOUD"], "log_level (--log-level, TICKLE_NS_LOG_LEVEL): must be 'DEBUG'"),
    (["ns", "--bogus", "1"], "unknown options: --bogus 1"),
    (["ns", "--tickle-backoff-s", "5", "--tickle-backoff-max-s", "1"],
     "tickle_backoff_max_s must be >= tickle_backoff_s"),
    (["task-server", "--tickle-tries", "0"], "tickle_tries (--tickle-tries, TICKLE_TS_TICKLE_TRIES)"),
    (["agent", "--cem", "maybe"], "unknown options: maybe"),
    (["agent", "--task-servers", "ftp://x"], "'ftp://x' is not an http:// or https:// URL"),
    (["agent", "run", "--tickle-port", "x"], "tickle_port (--tickle-port, TICKLE_AGENT_TICKLE_PORT)"),
    (["agent", "status", "--metrics-port", "-1"], "metrics_port (--metrics-port"),
    (["run", "pc1", "--task", "abc"], "tickle run: --task: must be a whole number (got 'abc')"),
    (["audit", "--limit", "0"], "tickle audit: --limit: must be at least 1 (got '0')"),
    (["output", "x"], "tickle output: EXECUTION_ID: must be a whole number (got 'x')"),
    (["task", "add", "t1", "--command", "true", "--timeout", "soon"], "--timeout: must be a number"),
    (["runs", "nosuch"], "No such command 'nosuch'"),
    (["--ns-url"], "--ns-url"),
]  # fmt: skip


_bad_flags: list[str] = []


@pytest.fixture(scope="module")
def bad_flag_results() -> Iterator[list[str]]:
    yield _bad_flags
    if _bad_flags:
        failed = [o for o in _bad_flags if o != "ok"]
        record(
            case="CLI: bad flags and values (operator and component commands)",
            done="non-numbers, out-of-range values, unknown options, a bad choice, a bad URL, "
            "a check across settings, a missing option value, an unknown command",
            outcome="; ".join(failed)
            or "exit 2, one line naming the option (and setting/variable), no library wording",
            tried=len(_bad_flags),
            command="pytest tests/test_cli_polish.py -k bad_value",
        )


@pytest.mark.attacks
@pytest.mark.parametrize(("command", "named"), BAD_FLAGS, ids=lambda c: " ".join(c)[:40])
def test_a_bad_value_is_one_plain_line_naming_it(
    monkeypatch: pytest.MonkeyPatch,
    bad_flag_results: list[str],
    command: list[str] | str,
    named: str,
) -> None:
    for variable in [v for v in os.environ if v.startswith("TICKLE_")]:
        monkeypatch.delenv(variable)
    assert isinstance(command, list)

    result = CliRunner().invoke(cli.app, command, prog_name="tickle")

    ok = (
        result.exit_code == 2
        and result.output.count("\n") == 1
        and named in result.output
        and not any(word in result.output for word in LIBRARY_WORDS)
    )
    bad_flag_results.append("ok" if ok else f"{' '.join(command)[:30]}: exit {result.exit_code}")
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1, result.output
    assert named in result.output, result.output
    for word in LIBRARY_WORDS:
        assert word not in result.output, result.output
    assert "got {" not in result.output  # a check across settings shows no inputs (secrets)


# --- --json: every listing and show, times in ISO 8601 -------------------------------------------

T0 = 1_796_000_000.25  # 2026-11-30, a quarter second past


def _execution(id_: int, computer: str, status: str = "succeeded") -> ExecutionOut:
    timeline = [TimelineStep(step=s, at=T0 + i * 0.0125) for i, s in enumerate(TIMELINE_STEPS)]
    steps = [
        StepResult(step=0, name="build", exit_code=0, status="succeeded", started_at=T0,
                   finished_at=T0 + 1.5),
    ]  # fmt: skip
    return ExecutionOut(
        id=id_, run_id=4711, computer=computer, task_server="ts-frankfurt-01", status=status,  # type: ignore[arg-type]
        via="tickle", exit_code=0, output_tail="ok\n", steps=steps, timeline=timeline,
        expires_at=T0 + 7200,
    )  # fmt: skip


COMPUTER_NAMES = ["web-frontend-0001.prod", "db-replica-0042.prod", "build-agent-9999.ci"]
RUN = RunOut(
    id=4711, created_at=T0, task_id=12, job_id=None, label="patch-openssl-nightly",
    executions=[_execution(1_000_000 + i, n) for i, n in enumerate(COMPUTER_NAMES)],
)  # fmt: skip
COMPUTER = ComputerOut(
    name=COMPUTER_NAMES[0], task_server="ts-frankfurt-01", tickle_state="reachable", cem=False,
    groups=["web", "frankfurt", "canary"], reported_address="10.20.30.40:50124",
    observed_address="203.0.113.200:61234", nat_detected=True, last_contact_at=T0,
    clock_offset_s=0.2, liveness="online", settings_version=17,
)  # fmt: skip
TASK_SERVER = TaskServerOut(
    name="ts-frankfurt-01", tickle_host="192.168.100.200", tickle_port=50123,
    api_url="https://ts-frankfurt-01.example.net:50121", tickle_state="reachable",
    last_pull_at=T0, clients=12345, clock_offset_s=-0.1,
)  # fmt: skip


class CannedNs:
    """An NS client answering every call with the objects above."""

    def __init__(self, url: str, token: str, ca_file: object = None) -> None:
        pass

    async def __aenter__(self) -> CannedNs:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    async def tasks(self) -> list[TaskOut]:
        return [TaskOut(id=12, name="patch-openssl", command=["apt-get", "-y", "upgrade"])]

    async def jobs(self) -> list[JobOut]:
        return [JobOut(id=3, name="nightly", task_ids=[12, 13, 14])]

    async def run(self, run_id: int) -> RunOut:
        return RUN

    async def wait_run(self, run_id: int, deadline_s: float, progress: object = None) -> RunOut:
        return RUN

    async def execution(self, execution_id: int) -> ExecutionOut:
        return RUN.executions[0]

    async def runs(self, **filters: object) -> RunsPage:
        summary = RunSummary(id=4711, created_at=T0, task_id=12, job_id=None,
                             label="patch-openssl-nightly", executions=3,
                             statuses={"succeeded": 2, "running": 1})  # fmt: skip
        return RunsPage(runs=[summary], next_before=4700)

    async def computer_executions(self, name: str, **filters: object) -> ExecutionsPage:
        return ExecutionsPage(executions=RUN.executions, next_before=None)

    async def computers(self, liveness: str | None = None) -> list[ComputerOut]:
        return [COMPUTER]

    async def task_servers(self) -> list[TaskServerOut]:
        return [TASK_SERVER]

    async def registrations(self, kind: str | None = None) -> list[RegistrationOut]:
        return [RegistrationOut(kind="computer", name="pc1", state="pending", identity="ab" * 8,
                                task_server="ts1", address="10.0.0.1", requested_at=T0,
                                last_seen_at=T0, decided_at=None)]  # fmt: skip

    async def settings(self) -> SettingsOut:
        return SettingsOut(version=17, task_request_interval_s=1800, poll_jitter_fraction=0.1,
                           ts_check_interval_s=300)  # fmt: skip

    async def operators(self) -> list[OperatorOut]:
        return [OperatorOut(name="alice", created_at=T0)]

    async def audit(self, *args: object) -> list[AuditEventOut]:
        return [AuditEventOut(id=1, at=T0, who="alice", action="run", target="run 4711",
                              detail={})]  # fmt: skip

    async def about(self) -> About:
        return About(version="0.1.0", database="sqlite", database_location="/var/lib/ns.db",
                     schema_revision="0008", dispatcher_active=True, started_at=T0)  # fmt: skip


JSON_COMMANDS = [
    ["task", "list"], ["job", "list"], ["runs", "list"], ["runs", "show", "4711"],
    ["executions", "show", "1000000"], ["history", "--computer", "pc1"], ["computers"],
    ["computers", "pending"], ["task-servers"], ["task-servers", "pending"], ["settings", "show"],
    ["operators", "list"], ["audit"], ["about"], ["timeline", "1000000"], ["watch", "4711"],
]  # fmt: skip


@pytest.fixture
def canned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(con, "NsClient", CannedNs)
    monkeypatch.setenv("TICKLE_ADMIN_TOKEN", "t0ken")


def _times(data: Any) -> Iterator[Any]:
    if isinstance(data, dict):
        for key, value in data.items():
            if key == "at" or key.endswith("_at"):
                yield value
            else:
                yield from _times(value)
    elif isinstance(data, list):
        for value in data:
            yield from _times(value)


@pytest.mark.usefixtures("canned")
@pytest.mark.parametrize("command", JSON_COMMANDS, ids=" ".join)
def test_json_output_has_iso_8601_times(command: list[str]) -> None:
    result = CliRunner().invoke(cli.app, [*command, "--json"], prog_name="tickle")

    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    times = [t for t in _times(data) if t is not None]
    assert times or command[0] in ("task", "job", "settings"), "the canned answer has times"
    for value in times:
        assert isinstance(value, str), value
        assert value.endswith("Z"), value
        assert datetime.fromisoformat(value).timestamp() == pytest.approx(T0, abs=7201)


@pytest.mark.usefixtures("canned")
def test_json_times_are_exact_to_the_millisecond() -> None:
    result = CliRunner().invoke(cli.app, ["runs", "show", "4711", "--json"], prog_name="tickle")

    data = json.loads(result.output)
    assert data["created_at"] == "2026-11-30T00:53:20.250Z"
    assert data["executions"][0]["timeline"][1]["at"] == "2026-11-30T00:53:20.262Z"


@pytest.mark.usefixtures("canned")
@pytest.mark.parametrize("command", JSON_COMMANDS, ids=" ".join)
def test_without_json_the_listings_print_text_not_json(command: list[str]) -> None:
    result = CliRunner().invoke(cli.app, command, prog_name="tickle")

    assert result.exit_code == 0, result.output
    assert not result.output.lstrip().startswith(("{", "[")), result.output


# --- tables: 100 columns, ids whole --------------------------------------------------------------


def _render(table: object, width: int = 100) -> list[str]:
    out = Console(record=True, width=width)
    out.print(table)
    return out.export_text().splitlines()


def _fits(lines: list[str], *whole: str) -> None:
    assert max(map(len, lines)) <= 100, "\n".join(lines)
    text = "\n".join(lines)
    for value in whole:
        assert value in text, f"{value!r} cut in:\n{text}"


def test_the_run_table_fits_100_columns_with_execution_ids() -> None:
    lines = _render(con.run_table(RUN))

    _fits(lines, "4711", "patch-openssl-nightly", "1000000", "1000001", "1000002",
          *COMPUTER_NAMES, "succeeded", "tickle", "started", "finished", "62.5", "75.0")  # fmt: skip


def test_the_wide_run_table_shows_every_hop() -> None:
    text = "\n".join(_render(con.run_table(RUN, wide=True), width=200))

    for step in TIMELINE_STEPS[1:]:
        assert step.replace("_", " ") in text
    assert "1000000" in text
    assert "100.0" in text


def test_the_other_tables_fit_100_columns() -> None:
    page = RunsPage(runs=[], next_before=None)
    _fits(_render(con.computers_table([COMPUTER])), COMPUTER_NAMES[0], "ts-frankfurt-01",
          "online", "v17", "reachable")  # fmt: skip
    wide = "\n".join(_render(con.computers_table([COMPUTER], wide=True), width=160))
    assert "203.0.113.200:61234" in wide
    assert "web,frankfurt,canary" in wide
    _fits(_render(con.task_servers_table([TASK_SERVER])), "ts-frankfurt-01", "12345")
    _fits(_render(con.executions_table(ExecutionsPage(executions=RUN.executions,
                                                      next_before=None), "t")),
          "1000000", "4711", "2026-11-30 00:53:20", "succeeded")  # fmt: skip
    _fits(_render(con.runs_table(page)))
    _fits(_render(con.timeline_table(RUN.executions[0])), "1000000", COMPUTER_NAMES[0])
    _fits(_render(con.steps_table(RUN.executions[0])), "1000000", "build")
    _fits(_render(con.tasks_table([TaskOut(id=12, name="patch", script="x" * 500)])), "12")
    _fits(_render(con.jobs_table([JobOut(id=3, name="nightly", task_ids=list(range(1, 51)))])))


def test_iso_times_converts_every_time_and_nothing_else() -> None:
    data = {"at": T0, "created_at": 0, "cached_at_ts": 5, "clock_offset_s": 1.5, "flag_at": True,
            "steps": [{"started_at": T0, "finished_at": None, "name": "x_at"}]}  # fmt: skip

    assert clock.iso_times(data) == {
        "at": "2026-11-30T00:53:20.250Z", "created_at": "1970-01-01T00:00:00.000Z",
        "cached_at_ts": 5, "clock_offset_s": 1.5, "flag_at": True,
        "steps": [{"started_at": "2026-11-30T00:53:20.250Z", "finished_at": None, "name": "x_at"}],
    }  # fmt: skip


async def test_agent_status_prints_iso_times(tmp_path: Path) -> None:
    socket_path = tmp_path / "agent.sock"
    status = {"name": "pc1", "last_pull_at": T0, "next_poll_at": None, "outbox_depth": 0}
    server = ControlServer(StubAgent(status), socket_path)
    await server.start()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tickle", "agent", "status", "--control-socket",
            str(socket_path), env={**_no_tickle_env(), "TICKLE_AGENT_STATE_DIR": str(tmp_path)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await server.close()

    assert proc.returncode == 0, stderr
    assert json.loads(stdout) == {"name": "pc1", "last_pull_at": "2026-11-30T00:53:20.250Z",
                                  "next_poll_at": None, "outbox_depth": 0}  # fmt: skip


def _no_tickle_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TICKLE_")}
