"""The `tickle` command: one subcommand per component, and the operator's commands on the NS API.

A thin face: each component is imported only when its subcommand runs, so `tickle agent` works on
an agent-only install. Which NS the operator commands talk to is said once, before the command:
`tickle [--ns-url URL] [--admin-token-file FILE] run ...` (or TICKLE_NS_URL etc.).
"""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console

from tickle import console as con
from tickle.messages import (
    FINAL_STATUSES,
    JobCreate,
    OperatorCreate,
    RunCreate,
    RunOut,
    SettingsUpdate,
    TaskCreate,
)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


class _RootGroup(typer.core.TyperGroup):
    """The `tickle` group; an NS option given after the command is told where it goes."""

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except Exception as exc:
            # click's NoSuchOption, matched by name: typer may bring its own copy of click
            option = getattr(exc, "option_name", None)
            if type(exc).__name__ == "NoSuchOption" and any(option in p.opts for p in self.params):
                exc.message = (  # type: ignore[attr-defined]
                    f"{option} goes before the command: "
                    f"tickle {option} ... {ctx.invoked_subcommand} ..."
                )
            raise


app = typer.Typer(
    cls=_RootGroup,
    help="Tickle: tickle task delivery for endpoint fleets. The options before the command say "
    "which NS the operator commands talk to.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


# --- components --------------------------------------------------------------------------------


@app.command("ns", context_settings=PASS_THROUGH)
def ns_command(ctx: typer.Context) -> None:
    """Run the notification server and its tickle server (flags, TICKLE_NS_*, --config)."""
    from tickle.ns.service import main as ns_main

    raise typer.Exit(ns_main(ctx.args))


@app.command("task-server", context_settings=PASS_THROUGH)
def task_server_command(ctx: typer.Context) -> None:
    """Run a task server (settings: flags, TICKLE_TS_*, --config)."""
    from tickle.taskserver.service import main as ts_main

    raise typer.Exit(ts_main(ctx.args))


class _AgentGroup(typer.core.TyperGroup):
    """`tickle agent [flags]` runs the agent; `tickle agent check-now` etc. talk to it."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:  # type: ignore[override]
        if not args or args[0] not in self.commands:
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
    from tickle.agent.service import main as agent_main

    raise typer.Exit(agent_main(ctx.args))


def _agent_control(action: str) -> Callable[[typer.Context], None]:
    def command(ctx: typer.Context) -> None:
        from tickle.agent.control import run_control_command

        raise typer.Exit(run_control_command(ctx.args, action))

    return command


agent_app.command(
    "check-now", context_settings=PASS_THROUGH, help="Fetch and run pending tasks at once."
)(_agent_control("check-now"))
agent_app.command(
    "policy-refresh",
    context_settings=PASS_THROUGH,
    help="Refresh the agent's configuration policy (does not fetch tasks).",
)(_agent_control("policy-refresh"))
agent_app.command("status", context_settings=PASS_THROUGH, help="Show the agent's state.")(
    _agent_control("status")
)


# --- operator commands on the NS API ------------------------------------------------------------

AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables")]


@dataclass(frozen=True)
class NsTarget:
    """The NS the operator commands talk to, and how (the root options, kept in the context)."""

    url: str
    token: str | None
    token_file: Path | None
    ca_file: Path | None


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
        typer.Option("--ca-file", envvar="TICKLE_CA_FILE", help="CA bundle to verify an https NS"),
    ] = None,
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
    out.print_json(json.dumps(data, default=str))


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
    name: str,
    command: Annotated[
        str | None, typer.Option(help="Command line to run (split like a shell)")
    ] = None,
    script: Annotated[
        Path | None, typer.Option(help="Shell script file to run ('-': stdin)")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Timeout in seconds")] = 300.0,
    as_json: AsJson = False,
) -> None:
    """Define a task: a command or a script, with a timeout."""
    spec = _task_spec(name, command, script, timeout)
    task = _with_ns(ctx, lambda c: c.add_task(spec))
    if as_json:
        _print_json(task.model_dump())
    else:
        out.print(f"task {task.id} {task.name!r} defined")


@task_app.command("list")
def task_list(ctx: typer.Context) -> None:
    """List the tasks."""
    tasks = _with_ns(ctx, lambda c: c.tasks())
    _print_json([t.model_dump() for t in tasks])


@job_app.command("add")
def job_add(
    ctx: typer.Context,
    name: str,
    task_ids: Annotated[list[int], typer.Argument(help="Task ids, in order")],
) -> None:
    """Define a job from tasks, run in order, stopping at the first failure."""
    spec = _valid("tickle job add", JobCreate, name=name, task_ids=task_ids)
    job = _with_ns(ctx, lambda c: c.add_job(spec))
    out.print(f"job {job.id} {job.name!r} defined with tasks {job.task_ids}")


@job_app.command("list")
def job_list(ctx: typer.Context) -> None:
    """List the jobs."""
    jobs = _with_ns(ctx, lambda c: c.jobs())
    _print_json([j.model_dump() for j in jobs])


@app.command("run")
def run_command(
    ctx: typer.Context,
    computers: Annotated[list[str] | None, typer.Argument(help="Computers to run on")] = None,
    task: Annotated[int | None, typer.Option("--task", help="Task id")] = None,
    job: Annotated[int | None, typer.Option("--job", help="Job id")] = None,
    command: Annotated[
        str | None, typer.Option("--command", help="Define a one-off task from this command line")
    ] = None,
    group: Annotated[list[str] | None, typer.Option("--group", help="Computer group")] = None,
    watch: Annotated[bool, typer.Option(help="Wait and show progress until all finish")] = True,
    wait_s: Annotated[float, typer.Option("--wait", help="How long to watch (s)")] = 300.0,
    as_json: AsJson = False,
) -> None:
    """Run a task or job now on computers (and groups); watch until every target finished."""
    if sum(x is not None for x in (task, job, command)) != 1:
        raise _failure("tickle run", "give exactly one of --task, --job or --command", 2)
    adhoc = None
    if command is not None:
        adhoc = _task_spec(f"adhoc-{int(time.time() * 1000)}", command, None, 300.0)
    # checked before anything reaches the NS (0 stands in for a one-off task's id until defined)
    create = _valid(
        "tickle run", RunCreate,
        task_id=task if adhoc is None else 0, job_id=job, computers=computers or [],
        groups=group or [],
    )  # fmt: skip

    async def work(c: con.NsClient) -> RunOut:
        run_create = create
        if adhoc is not None:
            run_create = create.model_copy(update={"task_id": (await c.add_task(adhoc)).id})
        run = await c.run_now(run_create)
        if not watch:
            return run
        if as_json:
            return await c.wait_run(run.id, wait_s)
        with con.progress_bar(err) as progress:
            return await c.wait_run(run.id, wait_s, progress)

    run = _with_ns(ctx, work)
    _show_run(run, as_json)
    if watch and any(e.status not in FINAL_STATUSES for e in run.executions):
        raise typer.Exit(3)
    if any(e.status != "succeeded" for e in run.executions if e.status in FINAL_STATUSES):
        raise typer.Exit(4)


@app.command("watch")
def watch_command(
    ctx: typer.Context,
    run_id: int,
    wait_s: Annotated[float, typer.Option("--wait", help="How long to watch (s)")] = 300.0,
    as_json: AsJson = False,
) -> None:
    """Watch a run's progress until every target finished."""

    async def work(c: con.NsClient) -> RunOut:
        with con.progress_bar(err) as progress:
            return await c.wait_run(run_id, wait_s, progress)

    _show_run(_with_ns(ctx, work), as_json)


@app.command("timeline")
def timeline_command(
    ctx: typer.Context,
    execution_id: int,
    as_json: AsJson = False,
) -> None:
    """Show one execution's nine-step timeline with the time spent in each hop."""
    e = _with_ns(ctx, lambda c: c.execution(execution_id))
    if as_json:
        _print_json(e.model_dump())
    else:
        out.print(con.timeline_table(e))
        if e.output_tail:
            out.print(f"output:\n{e.output_tail}")


@app.command("computers")
def computers_command(
    ctx: typer.Context,
    as_json: AsJson = False,
) -> None:
    """List computers: task server, tickle-reachable / tickle-unreachable / CEM, NAT."""
    items = _with_ns(ctx, lambda c: c.computers())
    if as_json:
        _print_json([i.model_dump() for i in items])
    else:
        out.print(con.computers_table(items))


@app.command("task-servers")
def task_servers_command(
    ctx: typer.Context,
    as_json: AsJson = False,
) -> None:
    """List task servers and whether tickles reach them."""
    items = _with_ns(ctx, lambda c: c.task_servers())
    if as_json:
        _print_json([i.model_dump() for i in items])
    else:
        out.print(con.task_servers_table(items))


@app.command("about")
def about_command(
    ctx: typer.Context,
    as_json: AsJson = False,
) -> None:
    """Show what the NS is: version, database, schema revision, tickle dispatcher role."""
    about = _with_ns(ctx, lambda c: c.about())
    if as_json:
        _print_json(about.model_dump())
    else:
        out.print(con.about_table(about))


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
        _print_json(creds.model_dump())
        return
    out.print(f"operator {creds.name!r} added; its token (shown only now):")
    out.print(creds.token, markup=False, highlight=False, soft_wrap=True)


@operators_app.command("list")
def operators_list(ctx: typer.Context, as_json: AsJson = False) -> None:
    """List the operator accounts. Admin token."""
    items = _with_ns(ctx, lambda c: c.operators())
    if as_json:
        _print_json([i.model_dump(mode="json") for i in items])
    else:
        for o in items:
            out.print(
                f"{o.name}  added {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(o.created_at))}"
            )


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
    if as_json:
        _print_json([e.model_dump(mode="json") for e in events])
    else:
        out.print(con.audit_table(events))


@settings_app.command("show")
def settings_show(ctx: typer.Context) -> None:
    """Show the central settings."""
    s = _with_ns(ctx, lambda c: c.settings())
    _print_json(s.model_dump())


@settings_app.command("set")
def settings_set(
    ctx: typer.Context,
    interval: Annotated[
        int | None, typer.Option("--task-request-interval", help="Task Request Interval (s)")
    ] = None,
    jitter: Annotated[
        float | None, typer.Option("--poll-jitter", help="Poll jitter, fraction of the interval")
    ] = None,
    ts_check: Annotated[
        int | None, typer.Option("--ts-check-interval", help="Task servers' NS check (s)")
    ] = None,
) -> None:
    """Change settings; task servers are tickled to pull them and hand them to their agents."""
    if interval is None and jitter is None and ts_check is None:
        raise _failure(
            "tickle settings set",
            "nothing to change: give --task-request-interval, --poll-jitter or --ts-check-interval",
            2,
        )
    update = _valid(
        "tickle settings set", SettingsUpdate,
        task_request_interval_s=interval, poll_jitter_fraction=jitter, ts_check_interval_s=ts_check,
    )  # fmt: skip
    s = _with_ns(ctx, lambda c: c.update_settings(update))
    _print_json(s.model_dump())


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


def _valid(prefix: str, model: type[M], **fields: Any) -> M:
    """The request body `model` built from the operator's input; a one-line exit 2 if invalid."""
    try:
        return model(**fields)
    except ValidationError as exc:
        raise _failure(prefix, exc, 2) from None


def _failure(prefix: str, reason: str | Exception, code: int) -> typer.Exit:
    """Say what went wrong in one line on stderr; the exit (with `code`) to raise."""
    if isinstance(reason, ValidationError):
        reason = "; ".join(_field_error(e["loc"], e["msg"]) for e in reason.errors())
    # soft_wrap: one line however narrow the terminal; markup off: a reason may hold [brackets]
    err.print(f"{prefix}: {reason}", style="red", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _field_error(loc: tuple[int | str, ...], msg: str) -> str:
    msg = msg.removeprefix("Value error, ")  # pydantic's wording for a validator's ValueError
    return f"{'.'.join(map(str, loc))}: {msg}" if loc else msg


def _show_run(run: RunOut, as_json: bool) -> None:
    if as_json:
        _print_json(run.model_dump())
    else:
        out.print(con.run_table(run))


def main() -> None:
    """Entry point of the `tickle` console script."""
    app()
