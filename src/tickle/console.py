"""The operator's console: a client of the NS API and the views the `tickle` CLI prints.

Imports only the shared pieces (messages, http), so it works on any install.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tickle import clock, http
from tickle.config import default_state_dir, plain_error
from tickle.messages import (
    FINAL_STATUSES,
    TIMELINE_STEPS,
    About,
    AuditEventOut,
    CancelOut,
    ComputerOut,
    ExecutionOut,
    ExecutionOutputOut,
    ExecutionsPage,
    JobCreate,
    JobOut,
    OperatorCreate,
    OperatorCredentials,
    OperatorOut,
    RegistrationKind,
    RegistrationOut,
    Rekeyed,
    RunCreate,
    RunOut,
    RunsPage,
    SettingsOut,
    SettingsReach,
    SettingsUpdate,
    TaskCreate,
    TaskOut,
    TaskServerOut,
)

DEFAULT_NS_URL = "http://127.0.0.1:50120"
# the path segment of each kind of registration, as in /api/computers and /api/task-servers
_PLURAL = {"computer": "computers", "task_server": "task-servers"}


class ConsoleError(Exception):
    """An operator-facing error: bad credentials, unreachable NS, a refused request."""


def resolve_admin_token(token: str | None, token_file: Path | None) -> str:
    """The admin token: given, read from a file, or the local NS's generated one."""
    if token:
        return token
    path = token_file or default_state_dir("ns") / "admin-token"
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise ConsoleError(
            f"no admin token: set TICKLE_ADMIN_TOKEN or --admin-token-file ({path}: {exc.strerror})"
        ) from None
    if not value:
        raise ConsoleError(f"admin token file {path} is empty")
    return value


# once every execution of a watched run is final, how long the watch waits at most for their
# timelines to settle (an `agent_pulled` a moment behind `finished`: see ExecutionOut.settled)
SETTLE_S = 5.0


@dataclass
class NsClient:
    """Async client of the NS operator API."""

    url: str
    token: str
    timeout_s: float = 10.0
    ca_file: Path | None = None  # verifies an https NS (None: the system trust store)

    async def __aenter__(self) -> NsClient:
        self._session = http.client_session(self.token, self.timeout_s, ca_file=self.ca_file)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        answer: Any = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        try:
            return await http.request(
                self._session, method, self.url.rstrip("/") + path, body=body, answer=answer,
                params=params,
            )  # fmt: skip
        except http.ApiError as exc:
            detail = "; ".join(map(_field_error, exc.errors)) or exc.detail
            raise ConsoleError(f"{method} {path}: HTTP {exc.status}: {detail}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ConsoleError(
                f"cannot reach the NS at {self.url}: {exc or type(exc).__name__}"
            ) from None
        except ValidationError as exc:  # another version of the NS, or not an NS at all
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"])) or "body"
            raise ConsoleError(
                f"{method} {path}: unexpected answer from {self.url} ({exc.error_count()}"
                f" problem(s), first: {where}: {first['msg']})"
            ) from None

    async def add_task(self, task: TaskCreate) -> TaskOut:
        return await self.call("POST", "/api/tasks", task, TaskOut)  # type: ignore[no-any-return]

    async def tasks(self) -> list[TaskOut]:
        return await self.call("GET", "/api/tasks", answer=list[TaskOut])  # type: ignore[no-any-return]

    async def add_job(self, job: JobCreate) -> JobOut:
        return await self.call("POST", "/api/jobs", job, JobOut)  # type: ignore[no-any-return]

    async def jobs(self) -> list[JobOut]:
        return await self.call("GET", "/api/jobs", answer=list[JobOut])  # type: ignore[no-any-return]

    async def run_now(self, run: RunCreate) -> RunOut:
        return await self.call("POST", "/api/runs", run, RunOut)  # type: ignore[no-any-return]

    async def run(self, run_id: int) -> RunOut:
        return await self.call("GET", f"/api/runs/{run_id}", answer=RunOut)  # type: ignore[no-any-return]

    async def execution(self, execution_id: int) -> ExecutionOut:
        return await self.call(  # type: ignore[no-any-return]
            "GET", f"/api/executions/{execution_id}", answer=ExecutionOut
        )

    async def output(self, execution_id: int, step: int | None = None) -> ExecutionOutputOut:
        query = "" if step is None else f"?step={step}"
        return await self.call(  # type: ignore[no-any-return]
            "GET", f"/api/executions/{execution_id}/output{query}", answer=ExecutionOutputOut
        )

    async def cancel(self, run_id: int, execution_id: int | None = None) -> CancelOut:
        query = "" if execution_id is None else f"?execution_id={execution_id}"
        return await self.call(  # type: ignore[no-any-return]
            "POST", f"/api/runs/{run_id}/cancel{query}", answer=CancelOut
        )

    async def rerun(self, run_id: int, failed: bool, expires_in_s: float | None = None) -> RunOut:
        query = f"?failed={str(failed).lower()}"
        if expires_in_s is not None:
            query += f"&expires_in_s={expires_in_s}"
        return await self.call(  # type: ignore[no-any-return]
            "POST", f"/api/runs/{run_id}/rerun{query}", answer=RunOut
        )

    async def task_servers(self) -> list[TaskServerOut]:
        return await self.call(  # type: ignore[no-any-return]
            "GET", "/api/task-servers", answer=list[TaskServerOut]
        )

    async def computers(self, liveness: str | None = None) -> list[ComputerOut]:
        params = {"liveness": liveness} if liveness else None
        return await self.call(  # type: ignore[no-any-return]
            "GET", "/api/computers", answer=list[ComputerOut], params=params
        )

    async def runs(self, **filters: str | int | None) -> RunsPage:
        """Runs, newest first; `filters`: the query of GET /api/runs (None: not given)."""
        return await self.call("GET", "/api/runs", answer=RunsPage, params=_query(filters))  # type: ignore[no-any-return]

    async def computer_executions(self, name: str, **filters: str | int | None) -> ExecutionsPage:
        return await self.call(  # type: ignore[no-any-return]
            "GET", f"/api/computers/{name}/executions", answer=ExecutionsPage,
            params=_query(filters),
        )  # fmt: skip

    async def delete_task(self, task_id: int) -> None:
        await self.call("DELETE", f"/api/tasks/{task_id}")

    async def delete_job(self, job_id: int) -> None:
        await self.call("DELETE", f"/api/jobs/{job_id}")

    async def forget_computer(self, name: str) -> None:
        await self.call("DELETE", f"/api/computers/{name}")

    async def delete_task_server(self, name: str, force: bool = False) -> None:
        params = {"force": "true"} if force else None
        await self.call("DELETE", f"/api/task-servers/{name}", params=params)

    async def settings_reach(self) -> SettingsReach:
        return await self.call("GET", "/api/settings/reach", answer=SettingsReach)  # type: ignore[no-any-return]

    async def registrations(self, kind: RegistrationKind | None = None) -> list[RegistrationOut]:
        """Registrations awaiting a decision, approved, or rejected (of `kind`, or all)."""
        query = f"?kind={kind}" if kind else ""
        return await self.call(  # type: ignore[no-any-return]
            "GET", f"/api/registrations{query}", answer=list[RegistrationOut]
        )

    async def decide(self, kind: RegistrationKind, name: str, verb: str) -> RegistrationOut:
        """`verb`: approve or reject the registration of `name`."""
        return await self.call(  # type: ignore[no-any-return]
            "POST", f"/api/{_PLURAL[kind]}/{name}/{verb}", answer=RegistrationOut
        )

    async def rekey(self, kind: RegistrationKind, name: str) -> Rekeyed:
        """Let the next registration under `name` bring a new identity."""
        return await self.call(  # type: ignore[no-any-return]
            "POST", f"/api/{_PLURAL[kind]}/{name}/rekey", answer=Rekeyed
        )

    async def settings(self) -> SettingsOut:
        return await self.call("GET", "/api/settings", answer=SettingsOut)  # type: ignore[no-any-return]

    async def update_settings(self, update: SettingsUpdate) -> SettingsOut:
        return await self.call("PUT", "/api/settings", update, SettingsOut)  # type: ignore[no-any-return]

    async def about(self) -> About:
        return await self.call("GET", "/api/about", answer=About)  # type: ignore[no-any-return]

    async def add_operator(self, name: str) -> OperatorCredentials:
        return await self.call(  # type: ignore[no-any-return]
            "POST", "/api/operators", OperatorCreate(name=name), OperatorCredentials
        )

    async def operators(self) -> list[OperatorOut]:
        return await self.call("GET", "/api/operators", answer=list[OperatorOut])  # type: ignore[no-any-return]

    async def audit(
        self, limit: int, who: str | None = None, action: str | None = None
    ) -> list[AuditEventOut]:
        query = f"?limit={limit}" + (f"&who={quote(who)}" if who else "")
        query += f"&action={quote(action)}" if action else ""
        return await self.call("GET", "/api/audit" + query, answer=list[AuditEventOut])  # type: ignore[no-any-return]

    async def wait_run(
        self, run_id: int, deadline_s: float, progress: Progress | None = None
    ) -> RunOut:
        """Poll the run until every execution is final with its timeline settled
        (`ExecutionOut.settled`: its `via` known) — once all are final, for `SETTLE_S` at most
        (a task server gone for good may hold an `agent_pulled` back) — or the deadline passes."""
        end = time.monotonic() + deadline_s
        task_id = None
        final_since: float | None = None
        while True:
            run = await self.run(run_id)
            done = sum(e.status in FINAL_STATUSES for e in run.executions)
            if progress is not None:
                if task_id is None:
                    task_id = progress.add_task(f"run {run_id}", total=len(run.executions))
                progress.update(task_id, completed=done)
            now = time.monotonic()
            if done == len(run.executions):
                final_since = now if final_since is None else final_since
                if all(e.settled() for e in run.executions) or now - final_since >= SETTLE_S:
                    return run
            if now >= end:
                return run
            await asyncio.sleep(0.2)


def progress_bar(console: Console) -> Progress:
    """The live progress display of `tickle run --watch` and `tickle watch`."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("finished"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def timeline_times(execution: ExecutionOut) -> dict[str, float | None]:
    """Step name → unix time (None: the execution did not go through that step)."""
    return {s.step: s.at for s in execution.timeline}


def run_table(run: RunOut, wide: bool = False) -> Table:
    """One row per execution: its id, status, how the task arrived, when it started and finished
    (ms after run-now); `wide`: the time of every hop instead."""
    title = f"run {run.id}" + (f" ({run.label})" if run.label else "")
    table = Table(title=f"{title}: ms after run-now")
    steps = TIMELINE_STEPS[1:] if wide else ("started", "finished")
    table.add_column("execution", justify="right", no_wrap=True)
    table.add_column("computer", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("via")
    table.add_column("exit", justify="right")
    for step in steps:
        table.add_column(step.replace("_", " "), justify="right")
    for e in sorted(run.executions, key=lambda x: (x.computer, x.id)):
        times = timeline_times(e)
        origin = times.get("created") or run.created_at
        table.add_row(
            str(e.id), e.computer, e.status, e.via or "-", _exit(e.exit_code),
            *(_ms(times.get(step), origin) for step in steps),
        )  # fmt: skip
    return table


def timeline_table(execution: ExecutionOut) -> Table:
    """The nine-step timeline of one execution: absolute offset and time spent in each hop."""
    table = Table(title=f"execution {execution.id} on {execution.computer}: {execution.status}")
    table.add_column("step")
    table.add_column("at (UTC)")
    table.add_column("since run-now (ms)", justify="right")
    table.add_column("hop (ms)", justify="right")
    times = timeline_times(execution)
    corrected = {s.step for s in execution.timeline if s.corrected}
    table.caption = timeline_note(execution)
    origin = times.get("created")
    previous = origin
    for step in TIMELINE_STEPS:
        at = times.get(step)
        stamp = _clock(at) + (" *" if step in corrected else "")
        hop = "-" if at is None or previous is None else f"{(at - previous) * 1000:.1f}"
        table.add_row(step, stamp, _ms(at, origin), hop)
        if at is not None:
            previous = at
    return table


def timeline_note(execution: ExecutionOut) -> str | None:
    """What was corrected for clock skew, one line per clock (None: nothing was)."""
    by_offset: dict[float, list[str]] = {}
    for s in execution.timeline:
        if s.corrected and s.clock_offset_s is not None:
            by_offset.setdefault(s.clock_offset_s, []).append(s.step)
    lines = [
        f"* {', '.join(steps)}: timed by a clock {abs(offset):.1f}s "
        f"{'ahead of' if offset > 0 else 'behind'} the NS's, shown corrected to the NS's clock"
        for offset, steps in by_offset.items()
    ]
    return "\n".join(lines) or None


def steps_table(execution: ExecutionOut) -> Table:
    """A job's (or task's) steps: status, exit code, when each ran and how long."""
    table = Table(title=f"steps of execution {execution.id}")
    for col in ("step", "name", "status", "exit", "started (UTC)", "took (ms)"):
        table.add_column(col, justify="right" if col in ("step", "exit", "took (ms)") else "left")
    for r in execution.steps:
        took = (
            "-"
            if r.started_at is None or r.finished_at is None
            else f"{(r.finished_at - r.started_at) * 1000:.1f}"
        )
        table.add_row(
            str(r.step), r.name, r.status, "-" if r.exit_code is None else str(r.exit_code),
            _clock(r.started_at), took,
        )  # fmt: skip
    return table


def computers_table(computers: Sequence[ComputerOut], wide: bool = False) -> Table:
    """One row per computer: liveness, last contact, settings version, tickle state, clock;
    `wide`: its groups, observed address and NAT too."""
    table = Table(title="computers")
    columns = ["name", "task server", "state", "last contact", "settings", "tickle", "clock"]
    for col in columns + (["groups", "observed", "NAT"] if wide else []):
        table.add_column(col, no_wrap=col in ("name", "task server", "state"))
    for c in computers:
        extra = (
            [
                ",".join(c.groups) or "-",
                c.observed_address or "-",
                "yes" if c.nat_detected else "no",
            ]
            if wide
            else []
        )
        table.add_row(
            c.name, c.task_server or "-", c.liveness, _ago(c.last_contact_at),
            "-" if c.settings_version is None else f"v{c.settings_version}", c.tickle_state,
            clock.describe(c.clock_offset_s), *extra,
        )  # fmt: skip
    return table


def tasks_table(tasks: Sequence[TaskOut]) -> Table:
    """One row per task: id, name, timeout, what it runs."""
    table = Table(title="tasks")
    table.add_column("id", justify="right", no_wrap=True)
    table.add_column("name", no_wrap=True)
    table.add_column("timeout (s)", justify="right")
    table.add_column("runs", overflow="ellipsis", no_wrap=True, max_width=60)
    for t in tasks:
        runs = shlex.join(t.command) if t.command else f"script ({len(t.script or '')} bytes)"
        table.add_row(str(t.id), t.name, f"{t.timeout_s:g}", runs)
    return table


def jobs_table(jobs: Sequence[JobOut]) -> Table:
    """One row per job: id, name, its tasks in order."""
    table = Table(title="jobs")
    table.add_column("id", justify="right", no_wrap=True)
    table.add_column("name", no_wrap=True)
    table.add_column("task ids, in order")
    for j in jobs:
        table.add_row(str(j.id), j.name, " ".join(map(str, j.task_ids)))
    return table


def settings_table(s: SettingsOut) -> Table:
    """The central settings, one per row."""
    table = Table(title=f"central settings (version {s.version})", show_header=False)
    table.add_column("setting")
    table.add_column("value", justify="right")
    table.add_row("Task Request Interval (s)", str(s.task_request_interval_s))
    table.add_row("poll jitter (fraction of the interval)", f"{s.poll_jitter_fraction:g}")
    table.add_row("task servers' NS check (s)", str(s.ts_check_interval_s))
    table.add_row("long-poll (agents that cannot be tickled)", "on" if s.long_poll else "off")
    table.add_row("long-poll timeout (s)", str(s.long_poll_timeout_s))
    return table


def operators_table(operators: Sequence[OperatorOut]) -> Table:
    table = Table(title="operators")
    table.add_column("name", no_wrap=True)
    table.add_column("added (UTC)")
    for o in operators:
        table.add_row(o.name, _utc(o.created_at))
    return table


def runs_table(page: RunsPage) -> Table:
    """One row per run, newest first: what ran, when, and its executions per status."""
    table = Table(title="runs (newest first)")
    for col in ("run", "created (UTC)", "what", "targets", "statuses"):
        table.add_column(
            col, justify="right" if col in ("run", "targets") else "left", no_wrap=col == "run"
        )
    for r in page.runs:
        what = r.label or "-"
        what += f" (task {r.task_id})" if r.task_id else f" (job {r.job_id})" if r.job_id else ""
        statuses = ", ".join(f"{n} {status}" for status, n in sorted(r.statuses.items()))
        table.add_row(str(r.id), _utc(r.created_at), what, str(r.executions), statuses or "-")
    if page.next_before is not None:
        table.caption = f"more: --before {page.next_before}"
    return table


def executions_table(page: ExecutionsPage, title: str) -> Table:
    """One row per execution, newest first: its run, status, exit code and when it was made."""
    table = Table(title=title)
    for col in ("execution", "run", "created (UTC)", "status", "via", "exit", "finished (UTC)"):
        right = col in ("execution", "run", "exit")
        table.add_column(col, justify="right" if right else "left", no_wrap=right)
    for e in page.executions:
        times = timeline_times(e)
        table.add_row(
            str(e.id), str(e.run_id), _utc(times.get("created")), e.status, e.via or "-",
            "-" if e.exit_code is None else str(e.exit_code), _utc(times.get("finished")),
        )  # fmt: skip
    if page.next_before is not None:
        table.caption = f"more: --before {page.next_before}"
    return table


def task_servers_table(servers: Sequence[TaskServerOut], wide: bool = False) -> Table:
    """One row per task server: tickle state, clients, clock, last pull; `wide`: its addresses."""
    table = Table(title="task servers")
    columns = ["name", "tickle", "clients", "clock", "last pull"]
    for col in columns + (["tickle address", "api"] if wide else []):
        table.add_column(col, no_wrap=col == "name")
    for s in servers:
        extra = [f"{s.tickle_host}:{s.tickle_port}", s.api_url] if wide else []
        table.add_row(
            s.name, s.tickle_state, str(s.clients), clock.describe(s.clock_offset_s),
            _ago(s.last_pull_at), *extra,
        )  # fmt: skip
    return table


def registrations_table(items: Sequence[RegistrationOut], kind: RegistrationKind) -> Table:
    """Registrations an operator decides on: state, identity, where they asked from and when."""
    computers = kind == "computer"
    table = Table(title="computer registrations" if computers else "task server registrations")
    columns = ["name", "state", "identity", *(["task server"] if computers else []), "address"]
    for col in (*columns, "asked", "last asked"):
        table.add_column(col)
    for r in items:
        via = [r.task_server or "-"] if computers else []
        table.add_row(
            r.name, r.state, r.identity or "-", *via, r.address or "-", _ago(r.requested_at),
            _ago(r.last_seen_at),
        )  # fmt: skip
    return table


def about_table(about: About) -> Table:
    """What the NS is: version, database (never credentials), schema, dispatcher role."""
    table = Table(title="notification server", show_header=False)
    table.add_column("what")
    table.add_column("value")
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(about.started_at))
    for name, value in (
        ("version", about.version),
        ("database", about.database),
        ("location", about.database_location),
        ("schema revision", about.schema_revision or "none"),
        ("tickle dispatcher", "active" if about.dispatcher_active else "standby"),
        ("started", f"{started} ({_ago(about.started_at)})"),
    ):
        table.add_row(name, value)
    return table


def _clock(at: float | None) -> str:
    """A time of day in UTC, to the millisecond."""
    if at is None:
        return "-"
    return time.strftime("%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}"


def audit_table(events: Sequence[AuditEventOut]) -> Table:
    """Operator actions, newest first: when, who, what, on what."""
    table = Table(title="audit")
    for col in ("when (UTC)", "who", "action", "target"):
        table.add_column(col)
    for e in events:
        table.add_row(
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.at)), e.who, e.action, e.target
        )
    return table


def _ms(at: float | None, origin: float | None) -> str:
    if at is None or origin is None:
        return "-"
    return f"{(at - origin) * 1000:.1f}"


def _exit(code: int | None) -> str:
    return "-" if code is None else str(code)


def _utc(at: float | None) -> str:
    return "-" if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))


def _field_error(error: dict[str, Any]) -> str:
    """One field error of a 422 in plain words: `computers.0: must match ...`."""
    loc = [str(p) for p in error.get("loc", [])]
    where = ".".join(loc[1:] if loc[:1] in (["body"], ["query"], ["path"]) else loc)
    return f"{where}: {plain_error(error)}" if where else plain_error(error)


def _query(filters: dict[str, str | int | None]) -> dict[str, str]:
    return {k: str(v) for k, v in filters.items() if v is not None}


def _ago(at: float | None) -> str:
    """How long ago, in the largest unit that keeps it short: 42s, 15m, 5h, 3d ago."""
    if at is None:
        return "never"
    seconds = max(0.0, time.time() - at)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"
