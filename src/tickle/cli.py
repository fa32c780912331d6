"""The `tickle` command: one subcommand per component, and the operator's commands on the NS API.

A thin face: each component is imported only when its subcommand runs, so `tickle agent` works on
an agent-only install. Which NS the operator commands talk to is said once, before the command:
`tickle [--ns-url URL] [--admin-token-file FILE] run ...` (or TICKLE_NS_URL etc.).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import shlex
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args, get_origin

import typer
from pydantic import BaseModel, TypeAdapter, ValidationError
from rich.console import Console

from tickle import clock
from tickle import console as con
from tickle.config import plain_error, settings_help
from tickle.messages import (
    FINAL_STATUSES,
    ExecutionStatus,
    JobCreate,
    Name,
    OperatorCreate,
    RegistrationKind,
    RunCreate,
    RunOut,
    SettingsOut,
    SettingsReach,
    SettingsUpdate,
    TaskCreate,
    TaskSpec,
)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
HELP_FLAGS = ("--help", "-h")
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


class _RootGroup(typer.core.TyperGroup):
    """The `tickle` group: help texts with plain value words; a bad command line is one plain
    line (exit 2); an NS option given after the command is told where it goes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _readable_help(self)

    def make_context(self, info_name: str | None, args: list[str], *a: Any, **kw: Any) -> Any:
        try:
            return super().make_context(info_name, args, *a, **kw)
        except Exception as exc:
            if not _is_usage_error(exc):
                raise
            raise _failure(info_name or "tickle", _usage_message(exc), 2) from None

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if not _is_usage_error(exc):
                raise
            # click's NoSuchOption, matched by name: typer may bring its own copy of click
            option = getattr(exc, "option_name", None)
            if type(exc).__name__ == "NoSuchOption" and any(option in p.opts for p in self.params):
                message = (
                    f"{option} goes before the command: "
                    f"tickle {option} ... {ctx.invoked_subcommand} ..."
                )
            else:
                message = _usage_message(exc)
            where = exc.ctx.command_path if getattr(exc, "ctx", None) else ctx.command_path  # type: ignore[attr-defined]
            raise _failure(where, message, 2) from None


def _usage_message(exc: Exception) -> str:
    """What is wrong with the command line, in plain words (typer checks values with pydantic:
    its wording is replaced)."""
    cause = exc.__cause__
    param = getattr(exc, "param", None)
    if isinstance(cause, ValidationError) and param is not None:
        argument = isinstance(param, typer.core.TyperArgument)
        name = str(param.name).upper() if argument else param.opts[0]
        problems = [f"{plain_error(e)} (got {e['input']!r})" for e in cause.errors()]
        return f"{name}: {'; '.join(problems)}"
    return str(exc.format_message())  # type: ignore[attr-defined]


def _is_usage_error(exc: Exception) -> bool:
    """A bad command line (click's UsageError, by name: typer may bring its own click), but not
    the help a group prints when given nothing."""
    names = {k.__name__ for k in type(exc).__mro__}
    return "UsageError" in names and "NoArgsIsHelpError" not in names


# the value words of the help texts (typer would print Python types: <int>, <list[str]>)
_VALUE_WORDS = {"int": "INTEGER", "float": "NUMBER", "str": "TEXT", "Path": "PATH"}


def _readable_help(command: Any) -> None:
    """Give every option and argument of `command` and its subcommands a plain value word."""
    for param in command.params:
        if isinstance(param, typer.core.TyperArgument):
            param.metavar = param.metavar or param.name.upper()
            # the name says what it is: no Python type after it
            param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]
        elif param.metavar is None and not param.is_flag and not param.type_descriptor.is_choice:
            annotation = param.type_descriptor.annotation
            element = get_args(annotation)[0] if get_origin(annotation) is list else annotation
            param.metavar = _VALUE_WORDS.get(getattr(element, "__name__", ""), "TEXT")
    for sub in getattr(command, "commands", {}).values():
        _readable_help(sub)


app = typer.Typer(
    cls=_RootGroup,
    help="Tickle: tickle task delivery for endpoint fleets. The options before the command say "
    "which NS the operator commands talk to.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
# piped: 100 columns (the width the tables are made for) unless COLUMNS says otherwise
out = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 100)
err = Console(stderr=True)


# --- components --------------------------------------------------------------------------------


@app.command("ns", context_settings=PASS_THROUGH)
def ns_command(ctx: typer.Context) -> None:
    """Run the notification server and its tickle server (flags, TICKLE_NS_*, --config)."""
    if _wants_help(ctx.args):
        from tickle.ns.settings import NsSettings

        _print_help(settings_help(NsSettings, "tickle ns"))
    from tickle.ns.service import main as ns_main

    raise typer.Exit(ns_main(ctx.args))


@app.command("task-server", context_settings=PASS_THROUGH)
def task_server_command(ctx: typer.Context) -> None:
    """Run a task server (settings: flags, TICKLE_TS_*, --config)."""
    if _wants_help(ctx.args):
        from tickle.taskserver.settings import TaskServerSettings

        _print_help(settings_help(TaskServerSettings, "tickle task-server"))
    from tickle.taskserver.service import main as ts_main

    raise typer.Exit(ts_main(ctx.args))


class _AgentGroup(typer.core.TyperGroup):
    """`tickle agent [flags]` runs the agent; `tickle agent check-now` etc. talk to it."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:  # type: ignore[override]
        if not args or (args[0] not in self.commands and args[0] not in HELP_FLAGS):
            args = ["run", *args]
        return super().parse_args(ctx, args)


agent_app = typer.Typer(
    cls=_AgentGroup,
    help="The client task agent: run it, or ask a running one to check now / refresh its policy.",
)
app.add_typer(agent_app, name="agent")


@agent_app.command("run", context_settings=PASS_THROUGH)
def agent_run(ctx: typer.Context) -> None:
    """Run the agent (settings: flags, TICKLE_AGENT_*, --config)."""
    if _wants_help(ctx.args):
        from tickle.agent.settings import AgentSettings

        _print_help(settings_help(AgentSettings, "tickle agent run"))
    from tickle.agent.service import main as agent_main

    raise typer.Exit(agent_main(ctx.args))


def _agent_control(action: str, summary: str) -> Callable[[typer.Context], None]:
    def command(ctx: typer.Context) -> None:
        if _wants_help(ctx.args):
            _print_help(
                f"Usage: tickle agent {action} [AGENT OPTIONS]\n\n  {summary}\n\n"
                "  The agent's own options say where its control socket is: --control-socket\n"
                "  PATH, --state-dir PATH or --config PATH (see tickle agent run --help).\n"
                "  Prints the agent's answer as JSON.\n"
            )
        from tickle.agent.control import run_control_command

        raise typer.Exit(run_control_command(ctx.args, action))

    return command


for _action, _summary in (
    ("check-now", "Fetch and run pending tasks at once."),
    ("policy-refresh", "Refresh the agent's configuration policy (does not fetch tasks)."),
    ("status", "Show the agent's state."),
):
    agent_app.command(_action, context_settings=PASS_THROUGH, help=_summary)(
        _agent_control(_action, _summary)
    )


def _wants_help(args: list[str]) -> bool:
    return any(arg in HELP_FLAGS for arg in args)


def _print_help(text: str) -> None:
    """Print a component command's help and end with exit 0."""
    sys.stdout.write(text)
    raise typer.Exit(0)


# --- operator commands on the NS API ------------------------------------------------------------

_STATUSES = ", ".join(get_args(ExecutionStatus))
RunArg = Annotated[int, typer.Argument(help="The run's id (as tickle run and runs list print)")]
ExecutionArg = Annotated[int, typer.Argument(help="The execution's id (as the run tables print)")]
NewName = Annotated[str, typer.Argument(help="Its name: letters, digits, . _ - (up to 64)")]
AsJson = Annotated[
    bool, typer.Option("--json", help="Print JSON (times in ISO 8601, UTC) instead of text")
]
Wide = Annotated[
    bool,
    typer.Option(
        "--wide", help="More columns (a run: the time of every hop); wider than 100 columns"
    ),
]


@dataclass(frozen=True)
class NsTarget:
    """The NS the operator commands talk to, and how (the root options, kept in the context)."""

    url: str
    token: str | None
    token_file: Path | None
    ca_file: Path | None


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"tickle {importlib.metadata.version('tickle')}\n")
        raise typer.Exit(0)


@app.callback()
def ns_target(
    ctx: typer.Context,
    ns_url: Annotated[
        str, typer.Option("--ns-url", envvar="TICKLE_NS_URL", help="The NS API URL")
    ] = con.DEFAULT_NS_URL,
    admin_token: Annotated[
        str | None,
        typer.Option(
            "--admin-token", envvar="TICKLE_ADMIN_TOKEN", help="Admin token", show_default=False
        ),
    ] = None,
    admin_token_file: Annotated[
        Path | None,
        typer.Option(
            "--admin-token-file",
            envvar="TICKLE_ADMIN_TOKEN_FILE",
            help="File holding the admin token (default: the local NS's generated one)",
        ),
    ] = None,
    ca_file: Annotated[
        Path | None,
        typer.Option(
            "--ca-file",
            envvar="TICKLE_CA_FILE",
            help="CA bundle (PEM) that verifies an https NS (default: the system trust store)",
        ),
    ] = None,
    _version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit"
        ),
    ] = False,
) -> None:
    """Keep the NS target of the operator commands in the context."""
    # Only kept here: the token is read when an operator command runs, so `tickle agent` never
    # looks for one.
    ctx.obj = NsTarget(ns_url, admin_token, admin_token_file, ca_file)


def _with_ns(ctx: typer.Context, work: Callable[[con.NsClient], Coroutine[Any, Any, T]]) -> T:
    target: NsTarget = ctx.obj  # set by the root callback, which runs before every command
    try:
        token = con.resolve_admin_token(target.token, target.token_file)

        async def go() -> T:
            async with con.NsClient(target.url, token, ca_file=target.ca_file) as client:
                return await work(client)

        return asyncio.run(go())
    except con.ConsoleError as exc:
        raise _failure("tickle", exc, 1) from None


def _print_json(data: Any) -> None:
    """`data` (models, or lists of them) as JSON, times as ISO 8601 UTC (the API's unix seconds
    converted: see README, Command line)."""
    plain = clock.iso_times(TypeAdapter(Any).dump_python(data, mode="json"))
    sys.stdout.write(json.dumps(plain, indent=2) + "\n")


def _show(data: Any, as_json: bool, table: Callable[[Any], Any]) -> None:
    """Print `data` as JSON (ISO times) with --json, else as its table."""
    if as_json:
        _print_json(data)
    else:
        out.print(table(data))


task_app = typer.Typer(help="Define tasks.")
job_app = typer.Typer(help="Define jobs (ordered lists of tasks, stopping at the first failure).")
settings_app = typer.Typer(help="Show or change the central settings (Task Request Interval...).")
app.add_typer(task_app, name="task")
app.add_typer(job_app, name="job")
app.add_typer(settings_app, name="settings")
operators_app = typer.Typer(
    help="Operator accounts: each has its own token, so the audit says who did what."
)
app.add_typer(operators_app, name="operators")


@task_app.command("add")
def task_add(
    ctx: typer.Context,
    name: NewName,
    command: Annotated[
        str | None, typer.Option(help="Command line to run (split like a shell)")
    ] = None,
    script: Annotated[
        Path | None, typer.Option(help="Shell script file to run ('-': stdin)")
    ] = None,
    timeout: Annotated[
        float, typer.Option(help="Seconds the task may run before it is stopped (up to 86400)")
    ] = 300.0,
    as_json: AsJson = False,
) -> None:
    """Define a task: a command or a script, with a timeout."""
    spec = _task_spec(name, command, script, timeout)
    task = _with_ns(ctx, lambda c: c.add_task(spec))
    if as_json:
        _print_json(task)
    else:
        out.print(f"task {task.id} {task.name!r} defined")


@task_app.command("list")
def task_list(ctx: typer.Context, as_json: AsJson = False) -> None:
    """List the tasks."""
    tasks = _with_ns(ctx, lambda c: c.tasks())
    _show(tasks, as_json, con.tasks_table)


@task_app.command("delete")
def task_delete(
    ctx: typer.Context, task_id: Annotated[int, typer.Argument(help="The task's id")]
) -> None:
    """Delete a task (refused while a job has it as a step or one of its runs is unfinished);
    its runs stay in the history."""
    _with_ns(ctx, lambda c: c.delete_task(task_id))
    out.print(f"task {task_id} deleted")


@job_app.command("add")
def job_add(
    ctx: typer.Context,
    name: NewName,
    task_ids: Annotated[list[int], typer.Argument(help="Task ids, in order (1 to 50)")],
    as_json: AsJson = False,
) -> None:
    """Define a job from tasks, run in order, stopping at the first failure."""
    spec = _valid("tickle job add", JobCreate, name=name, task_ids=task_ids)
    job = _with_ns(ctx, lambda c: c.add_job(spec))
    if as_json:
        _print_json(job)
    else:
        out.print(f"job {job.id} {job.name!r} defined with tasks {job.task_ids}")


@job_app.command("list")
def job_list(ctx: typer.Context, as_json: AsJson = False) -> None:
    """List the jobs."""
    jobs = _with_ns(ctx, lambda c: c.jobs())
    _show(jobs, as_json, con.jobs_table)


@job_app.command("delete")
def job_delete(
    ctx: typer.Context, job_id: Annotated[int, typer.Argument(help="The job's id")]
) -> None:
    """Delete a job (its tasks stay; refused while one of its runs is unfinished); its runs stay
    in the history."""
    _with_ns(ctx, lambda c: c.delete_job(job_id))
    out.print(f"job {job_id} deleted")


@app.command("run")
def run_command(
    ctx: typer.Context,
    computers: Annotated[list[str] | None, typer.Argument(help="Computers to run on")] = None,
    task: Annotated[int | None, typer.Option("--task", help="Task id")] = None,
    job: Annotated[int | None, typer.Option("--job", help="Job id")] = None,
    command: Annotated[
        str | None,
        typer.Option(
            "--command", help="Run this command line once (kept with the run, not as a task)"
        ),
    ] = None,
    group: Annotated[list[str] | None, typer.Option("--group", help="Computer group")] = None,
    every: Annotated[bool, typer.Option("--all", help="Run on every registered computer")] = False,
    rerun: Annotated[
        int | None,
        typer.Option(
            "--rerun",
            help="Run that run's task or job again, on its computers (with --failed: those "
            "whose execution failed, timed out, was interrupted, cancelled, expired or lost)",
        ),
    ] = None,
    failed: Annotated[
        bool, typer.Option("--failed", help="With --rerun: only the computers that did not succeed")
    ] = False,
    expires_in: Annotated[
        str | None,
        typer.Option(
            "--expires-in",
            help="Executions not started within this time end expired (90s, 30m, 2h, 1d; "
            "default: the NS's default_run_expiry_s)",
        ),
    ] = None,
    watch: Annotated[bool, typer.Option(help="Wait and show progress until all finish")] = True,
    wait_s: Annotated[float, typer.Option("--wait", help="How long to watch (s)")] = 300.0,
    as_json: AsJson = False,
    wide: Wide = False,
) -> None:
    """Run a task or job now on computers (and groups, or --all); watch until every target
    finished. --rerun RUN [--failed] runs a run's task, job or command again."""
    if failed and rerun is None:
        raise _failure("tickle run", "--failed goes with --rerun RUN", 2)
    if rerun is not None:
        if task is not None or job is not None or command is not None:
            raise _failure("tickle run", "--rerun takes the run's task or job: give no other", 2)
    elif sum(x is not None for x in (task, job, command)) != 1:
        raise _failure("tickle run", "give exactly one of --task, --job or --command", 2)
    expires_in_s = None if expires_in is None else _duration("tickle run: --expires-in", expires_in)
    # an ad-hoc command travels inline with the run: it is not added to the defined tasks
    inline = None if command is None else _task_spec("adhoc", command, None, 300.0)
    # checked before anything reaches the NS (a rerun's task and computers are the NS's)
    create = None
    if rerun is None:
        create = _valid(
            "tickle run", RunCreate,
            task_id=task, job_id=job,
            task=None if inline is None else TaskSpec.model_validate(inline.model_dump()),
            computers=computers or [], groups=group or [],
            all_computers=every, expires_in_s=expires_in_s,
        )  # fmt: skip

    async def work(c: con.NsClient) -> RunOut:
        if create is None:  # a rerun: the NS takes the run's task, job or command
            run = await c.rerun(rerun or 0, failed, expires_in_s)
        else:
            run = await c.run_now(create)
        if not watch:
            return run
        if as_json:
            return await c.wait_run(run.id, wait_s)
        with con.progress_bar(err) as progress:
            return await c.wait_run(run.id, wait_s, progress)

    run = _with_ns(ctx, work)
    _show_run(run, as_json, wide)
    if watch and any(e.status not in FINAL_STATUSES for e in run.executions):
        raise typer.Exit(3)
    if any(e.status != "succeeded" for e in run.executions if e.status in FINAL_STATUSES):
        raise typer.Exit(4)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(prefix: str, text: str) -> float:
    """Seconds of "90", "90s", "30m", "2h" or "1d"; a one-line exit 2 otherwise."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        raise _failure(prefix, f"{text!r} is not a duration like 90s, 30m, 2h or 1d", 2) from None
    if not seconds > 0:
        raise _failure(prefix, f"{text!r} must be more than 0", 2)
    return seconds


@app.command("cancel")
def cancel_command(
    ctx: typer.Context,
    run_id: Annotated[int, typer.Argument(help="The run to cancel (its id)")],
    execution: Annotated[
        int | None, typer.Option("--execution", help="Cancel only this execution of the run")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Cancel a run (or one execution): what has not started never starts; what runs is
    stopped by its agent, with every process it started, and recorded cancelled."""
    result = _with_ns(ctx, lambda c: c.cancel(run_id, execution))
    if as_json:
        _print_json(result)
        return
    for what, ids in (
        ("cancelled", result.cancelled),
        ("being stopped by their agents", result.stopping),
        ("had ended already", result.already_final),
    ):
        if ids:
            out.print(f"run {run_id}: {', '.join(map(str, ids))} {what}")


@app.command("output")
def output_command(
    ctx: typer.Context,
    execution_id: ExecutionArg,
    step: Annotated[
        int | None, typer.Option("--step", help="Only this step (0: the first)")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Print an execution's output, step by step, stdout and stderr each under its own header
    (kept up to the agent's cap per step; a marker line says where and how much was cut)."""
    result = _with_ns(ctx, lambda c: c.output(execution_id, step))
    if as_json:
        _print_json(result)
        return
    if not result.steps:
        err.print(f"execution {execution_id}: no output (yet)", markup=False, highlight=False)
    for s in result.steps:
        for stream, text in (("stdout", s.stdout), ("stderr", s.stderr)):
            if not text:
                continue
            sys.stdout.write(f"=== step {s.step} ({s.name}) {stream} ===\n")
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


@app.command("watch")
def watch_command(
    ctx: typer.Context,
    run_id: RunArg,
    wait_s: Annotated[float, typer.Option("--wait", help="How long to watch (s)")] = 300.0,
    as_json: AsJson = False,
    wide: Wide = False,
) -> None:
    """Watch a run's progress until every target finished."""

    async def work(c: con.NsClient) -> RunOut:
        with con.progress_bar(err) as progress:
            return await c.wait_run(run_id, wait_s, progress)

    _show_run(_with_ns(ctx, work), as_json, wide)


@app.command("timeline")
def timeline_command(
    ctx: typer.Context,
    execution_id: ExecutionArg,
    as_json: AsJson = False,
) -> None:
    """Show one execution's nine-step timeline with the time spent in each hop."""
    e = _with_ns(ctx, lambda c: c.execution(execution_id))
    if as_json:
        _print_json(e)
    else:
        out.print(con.timeline_table(e))
        if e.steps:
            out.print(con.steps_table(e))
        if e.output_tail:
            out.print(f"output:\n{e.output_tail}")


computers_app = typer.Typer(
    help="List computers (bare `tickle computers`); approve, reject or re-key their agents' "
    "registrations; forget one.",
    invoke_without_command=True,
)
task_servers_app = typer.Typer(
    help="List task servers (bare `tickle task-servers`); approve, reject or re-key their "
    "registrations; delete one.",
    invoke_without_command=True,
)
app.add_typer(computers_app, name="computers")
app.add_typer(task_servers_app, name="task-servers")


@computers_app.callback()
def computers_command(
    ctx: typer.Context,
    offline: Annotated[bool, typer.Option("--offline", help="Only the offline computers")] = False,
    online: Annotated[bool, typer.Option("--online", help="Only the online computers")] = False,
    as_json: AsJson = False,
    wide: Wide = False,
) -> None:
    """List computers: online/offline, last contact, settings version, tickle state, NAT.

    Offline: not heard from (poll, pull, event, registration) within 2 x the Task Request
    Interval + 60 s (the NS's offline_intervals and offline_slack_s).
    """
    if ctx.invoked_subcommand is not None:
        return
    if offline and online:
        raise _failure("tickle computers", "give at most one of --offline or --online", 2)
    liveness = "offline" if offline else "online" if online else None
    items = _with_ns(ctx, lambda c: c.computers(liveness))
    if as_json:
        _print_json(items)
    else:
        out.print(con.computers_table(items, wide))


@computers_app.command("forget")
def computers_forget(ctx: typer.Context, name: NameArg) -> None:
    """Forget a computer: its agent's credentials go (its next registration is a new computer);
    its history stays. Refused while one of its executions is unfinished."""
    _with_ns(ctx, lambda c: c.forget_computer(name))
    out.print(f"computer {name} forgotten")


@task_servers_app.callback()
def task_servers_command(
    ctx: typer.Context,
    as_json: AsJson = False,
    wide: Wide = False,
) -> None:
    """List task servers and whether tickles reach them."""
    if ctx.invoked_subcommand is not None:
        return
    items = _with_ns(ctx, lambda c: c.task_servers())
    if as_json:
        _print_json(items)
    else:
        out.print(con.task_servers_table(items, wide))


NameArg = Annotated[str, typer.Argument(help="Its name", show_default=False)]


def _registration_commands(group: typer.Typer, kind: RegistrationKind) -> None:
    """`pending`, `approve`, `reject`, `rekey` under `tickle computers` / `tickle task-servers`."""
    what, peer = ("computer", "agent") if kind == "computer" else ("task server", "task server")
    command = "computers" if kind == "computer" else "task-servers"

    @group.command(
        "pending",
        help=f"List registrations of new {peer}s awaiting approval (registration_approval = "
        "manual), and approved or rejected ones not registered since.",
    )
    def pending(ctx: typer.Context, as_json: AsJson = False) -> None:
        items = _with_ns(ctx, lambda c: c.registrations(kind))
        if as_json:
            _print_json(items)
        else:
            out.print(con.registrations_table(items, kind))

    @group.command("approve", help=f"Approve a new {peer}: its next registration gets credentials.")
    def approve(ctx: typer.Context, name: NameArg) -> None:
        _name_ok(f"tickle {command} approve", name)
        _with_ns(ctx, lambda c: c.decide(kind, name, "approve"))
        out.print(f"{what} {name} approved: it gets its credentials when it next asks")

    @group.command("reject", help=f"Reject a new {peer}: it never gets credentials.")
    def reject(ctx: typer.Context, name: NameArg) -> None:
        _name_ok(f"tickle {command} reject", name)
        _with_ns(ctx, lambda c: c.decide(kind, name, "reject"))
        out.print(f"{what} {name} rejected: it gets no credentials")

    @group.command(
        "rekey",
        help=f"Let the next registration under this name bring a new {peer} identity (a "
        f"reinstalled or replaced {peer}); it replaces the {what}'s credentials.",
    )
    def rekey(ctx: typer.Context, name: NameArg) -> None:
        _name_ok(f"tickle {command} rekey", name)
        _with_ns(ctx, lambda c: c.rekey(kind, name))
        out.print(f"{what} {name} re-keyed: the next registration under this name is accepted")


_registration_commands(computers_app, "computer")
_registration_commands(task_servers_app, "task_server")


@task_servers_app.command("delete")
def task_servers_delete(
    ctx: typer.Context,
    name: NameArg,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Delete even while it serves computers: they stay, with no task server, until "
            "their agents register through another one",
        ),
    ] = False,
) -> None:
    """Delete a task server (stop it first: a running one registers again)."""
    _with_ns(ctx, lambda c: c.delete_task_server(name, force))
    out.print(f"task server {name} deleted")


# --- history ------------------------------------------------------------------------------------

runs_app = typer.Typer(help="The history of runs: list them, show one.")
executions_app = typer.Typer(help="Executions: one run of a task or job on one computer.")
app.add_typer(runs_app, name="runs")
app.add_typer(executions_app, name="executions")
Limit = Annotated[
    int, typer.Option("--limit", help="At most this many, newest first", min=1, max=500)
]
Before = Annotated[
    int | None, typer.Option("--before", help="The next page: ids below this one (as printed)")
]
StatusOption = Annotated[
    str | None, typer.Option("--status", help=f"With an execution in this status ({_STATUSES})")
]


@runs_app.command("list")
def runs_list(
    ctx: typer.Context,
    status: StatusOption = None,
    task: Annotated[int | None, typer.Option("--task", help="Runs of this task id")] = None,
    job: Annotated[int | None, typer.Option("--job", help="Runs of this job id")] = None,
    computer: Annotated[
        str | None, typer.Option("--computer", help="Runs with an execution on this computer")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Made at or after: ISO 8601 (UTC if no zone) or 30m, 2h, 7d"),
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", help="Made before: ISO 8601 or 30m, 2h, 7d (ago)")
    ] = None,
    limit: Limit = 20,
    before: Before = None,
    as_json: AsJson = False,
) -> None:
    """List runs, newest first, with their executions per status."""
    _check_status(status)
    filters = {
        "status": status, "task_id": task, "job_id": job, "computer": computer,
        "since": _when("--since", since), "until": _when("--until", until), "limit": limit,
        "before": before,
    }  # fmt: skip
    page = _with_ns(ctx, lambda c: c.runs(**filters))
    _show(page, as_json, con.runs_table)


@runs_app.command("show")
def runs_show(
    ctx: typer.Context, run_id: RunArg, as_json: AsJson = False, wide: Wide = False
) -> None:
    """Show a run and each of its executions."""
    _show_run(_with_ns(ctx, lambda c: c.run(run_id)), as_json, wide)


@executions_app.command("show")
def executions_show(
    ctx: typer.Context, execution_id: ExecutionArg, as_json: AsJson = False
) -> None:
    """Show one execution in full: status, steps, timeline, output."""
    e = _with_ns(ctx, lambda c: c.execution(execution_id))
    if as_json:
        _print_json(e)
        return
    out.print(con.timeline_table(e))
    for step in e.steps:
        out.print(f"step {step.step} {step.name}: {step.status} (exit {step.exit_code})")
    if e.output_tail:
        out.print(f"output:\n{e.output_tail}", markup=False, highlight=False)


@app.command("history")
def history_command(
    ctx: typer.Context,
    computer: Annotated[str, typer.Option("--computer", help="The computer whose history")],
    status: Annotated[
        str | None, typer.Option("--status", help=f"Only this status ({_STATUSES})")
    ] = None,
    limit: Limit = 20,
    before: Before = None,
    as_json: AsJson = False,
) -> None:
    """A computer's executions, newest first (a forgotten computer's too)."""
    _check_status(status)
    page = _with_ns(
        ctx, lambda c: c.computer_executions(computer, status=status, limit=limit, before=before)
    )
    if as_json:
        _print_json(page)
    else:
        out.print(con.executions_table(page, f"executions on {computer} (newest first)"))


@app.command("about")
def about_command(
    ctx: typer.Context,
    as_json: AsJson = False,
) -> None:
    """Show what the NS is: version, database, schema revision, tickle dispatcher role."""
    about = _with_ns(ctx, lambda c: c.about())
    _show(about, as_json, con.about_table)


@operators_app.command("add")
def operators_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The operator's name (letters, digits, . _ -)")],
    as_json: AsJson = False,
) -> None:
    """Add an operator account and print its token, once (the NS keeps only a hash). Admin token."""
    spec = _valid("tickle operators add", OperatorCreate, name=name)
    creds = _with_ns(ctx, lambda c: c.add_operator(spec.name))
    if as_json:
        _print_json(creds)
        return
    out.print(f"operator {creds.name!r} added; its token (shown only now):")
    out.print(creds.token, markup=False, highlight=False, soft_wrap=True)


@operators_app.command("list")
def operators_list(ctx: typer.Context, as_json: AsJson = False) -> None:
    """List the operator accounts. Admin token."""
    items = _with_ns(ctx, lambda c: c.operators())
    _show(items, as_json, con.operators_table)


@app.command("audit")
def audit_command(
    ctx: typer.Context,
    limit: Annotated[
        int, typer.Option(help="How many of the newest actions", min=1, max=1000)
    ] = 50,
    who: Annotated[str | None, typer.Option(help="Only this operator's (or admin's)")] = None,
    action: Annotated[
        str | None, typer.Option(help="Only this kind: run, settings, task.define, login...")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Show operator actions, newest first: who, when, what, on what. Admin token."""
    events = _with_ns(ctx, lambda c: c.audit(limit, who, action))
    _show(events, as_json, con.audit_table)


@settings_app.command("show")
def settings_show(ctx: typer.Context, as_json: AsJson = False) -> None:
    """Show the central settings."""
    s = _with_ns(ctx, lambda c: c.settings())
    _show(s, as_json, con.settings_table)


@settings_app.command("set")
def settings_set(
    ctx: typer.Context,
    interval: Annotated[
        int | None,
        typer.Option(
            "--task-request-interval",
            help="Task Request Interval: how often agents poll (s, 10 to 86400)",
        ),
    ] = None,
    jitter: Annotated[
        float | None,
        typer.Option("--poll-jitter", help="Poll jitter, a fraction of the interval (0 to 0.5)"),
    ] = None,
    ts_check: Annotated[
        int | None,
        typer.Option(
            "--ts-check-interval", help="How often task servers check the NS (s, 5 to 86400)"
        ),
    ] = None,
    long_poll: Annotated[
        bool | None,
        typer.Option(
            "--long-poll/--no-long-poll",
            help="Agents that cannot be tickled (CEM, tickle-unreachable) hold a long-poll open "
            "and start work within a second (off: they poll)",
        ),
    ] = None,
    long_poll_timeout: Annotated[
        int | None,
        typer.Option("--long-poll-timeout", help="How long a long-poll waits, then re-arms (s)"),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Change settings; task servers are tickled to pull them and hand them to their agents."""
    given = (interval, jitter, ts_check, long_poll, long_poll_timeout)
    if all(value is None for value in given):
        raise _failure(
            "tickle settings set",
            "nothing to change: give --task-request-interval, --poll-jitter, --ts-check-interval,"
            " --long-poll/--no-long-poll or --long-poll-timeout",
            2,
        )
    update = _valid(
        "tickle settings set", SettingsUpdate,
        task_request_interval_s=interval, poll_jitter_fraction=jitter, ts_check_interval_s=ts_check,
        long_poll=long_poll, long_poll_timeout_s=long_poll_timeout,
    )  # fmt: skip

    async def work(c: con.NsClient) -> tuple[SettingsOut, SettingsReach]:
        return await c.update_settings(update), await c.settings_reach()

    s, reach = _with_ns(ctx, work)
    _show(s, as_json, con.settings_table)
    err.print(
        f"settings version {reach.version}: {reach.current} agent(s) have it, {reach.pending}"
        " take it at their next contact (a settings tickle, or their next poll)",
        markup=False, highlight=False, soft_wrap=True,
    )  # fmt: skip


def _task_spec(name: str, command: str | None, script: Path | None, timeout: float) -> TaskCreate:
    try:
        if command is not None and script is None:
            return TaskCreate(name=name, command=shlex.split(command), timeout_s=timeout)
        if script is not None and command is None:
            text = sys.stdin.read() if str(script) == "-" else script.read_text()
            return TaskCreate(name=name, script=text, timeout_s=timeout)
    except (ValueError, OSError) as exc:
        raise _failure("tickle: bad task", exc, 2) from None
    raise _failure("tickle", "give exactly one of --command or --script", 2)


def _name_ok(prefix: str, name: str) -> None:
    """A one-line exit 2 when `name` cannot be a computer's or task server's name."""
    try:
        TypeAdapter(Name).validate_python(name)
    except ValidationError as exc:
        raise _failure(prefix, f"name {name!r}: {exc.errors()[0]['msg']}", 2) from None


def _check_status(status: str | None) -> None:
    statuses = get_args(ExecutionStatus)
    if status is not None and status not in statuses:
        raise _failure("tickle", f"--status: {status!r} is not one of {', '.join(statuses)}", 2)


def _when(option: str, text: str | None) -> str | None:
    """An operator's time (ISO 8601, UTC when it names no zone; or 30s, 15m, 2h, 7d ago) as
    ISO 8601; a one-line exit 2 if it is neither."""
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value = text.strip()
    if value[-1:] in units and value[:-1].isdigit():
        at = datetime.now(UTC) - timedelta(seconds=int(value[:-1]) * units[value[-1]])
        return at.isoformat()
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise _failure(
            "tickle", f"{option}: {text!r} is neither ISO 8601 nor a duration like 2h", 2
        ) from None
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).isoformat()


def _valid(prefix: str, model: type[M], **fields: Any) -> M:
    """The request body `model` built from the operator's input; a one-line exit 2 if invalid."""
    try:
        return model(**fields)
    except ValidationError as exc:
        raise _failure(prefix, exc, 2) from None


def _failure(prefix: str, reason: str | Exception, code: int) -> typer.Exit:
    """Say what went wrong in one line on stderr; the exit (with `code`) to raise."""
    if isinstance(reason, ValidationError):
        reason = "; ".join(_field_error(e) for e in reason.errors())
    # soft_wrap: one line however narrow the terminal; markup off: a reason may hold [brackets]
    err.print(f"{prefix}: {reason}", style="red", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _field_error(error: Any) -> str:
    where = ".".join(map(str, error["loc"]))
    return f"{where}: {plain_error(error)}" if where else plain_error(error)


def _show_run(run: RunOut, as_json: bool, wide: bool = False) -> None:
    if as_json:
        _print_json(run)
    else:
        out.print(con.run_table(run, wide))


def main() -> None:
    """Entry point of the `tickle` console script."""
    app()
