"""The history store: what ran (runs and a computer's executions, newest first, in pages), the
deletion of what the operator no longer needs (tasks, jobs, computers, task servers), and how far
the settings reached the agents.

Deleting never loses history: a run keeps its label and its executions their task snapshots, so a
deleted task's or job's runs stay listed; a forgotten computer's executions stay under its name.
Deleting what work in progress still needs is refused (409, naming what refers to it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session

from tickle import messages as m
from tickle.ns import views
from tickle.ns.credentials import CallerCache, new_tickle_key
from tickle.ns.database import Database
from tickle.ns.errors import Conflict, NotFound
from tickle.ns.models import Computer, Execution, Job, JobTask, Run, Settings, Task, TaskServer

_UNFINISHED = Execution.status.not_in(m.FINAL_STATUSES)


@dataclass(frozen=True, slots=True)
class RunFilter:
    """Which runs to list: each given field narrows the list."""

    status: m.ExecutionStatus | None = None  # runs with an execution in this status
    task_id: int | None = None
    job_id: int | None = None
    computer: str | None = None  # runs with an execution on this computer
    since: datetime | None = None  # created at or after
    until: datetime | None = None  # created before


class HistoryStore:
    """Run history, deletions and the settings' reach in the NS database."""

    def __init__(self, database: Database, callers: CallerCache | None = None) -> None:
        self._db = database
        self._callers = callers  # the inventory's task-server tokens: a deletion ends one

    def runs(self, where: RunFilter, limit: int, before: int | None = None) -> m.RunsPage:
        """Runs matching `where`, newest first: at most `limit`, with ids below `before`."""
        conditions: list[ColumnElement[bool]] = []
        if before is not None:
            conditions.append(Run.id < before)
        if where.task_id is not None:
            conditions.append(Run.task_id == where.task_id)
        if where.job_id is not None:
            conditions.append(Run.job_id == where.job_id)
        if where.since is not None:
            conditions.append(Run.created_at >= _epoch(where.since))
        if where.until is not None:
            conditions.append(Run.created_at < _epoch(where.until))
        if where.status is not None or where.computer is not None:
            matching = select(Execution.run_id)
            if where.status is not None:
                matching = matching.where(Execution.status == where.status)
            if where.computer is not None:
                matching = matching.join(Computer, Execution.computer_id == Computer.id).where(
                    Computer.name == where.computer
                )
            conditions.append(Run.id.in_(matching))
        with self._db.reading() as s:
            # columns, not rows: a Run row would load every execution of the run
            rows = s.execute(
                select(Run.id, Run.created_at, Run.task_id, Run.job_id, Run.label)
                .where(*conditions)
                .order_by(Run.id.desc())
                .limit(limit + 1)
            ).all()
            page = rows[:limit]
            statuses: dict[int, dict[str, int]] = {r.id: {} for r in page}
            for run_id, status, n in s.execute(
                select(Execution.run_id, Execution.status, func.count())
                .where(Execution.run_id.in_(statuses))
                .group_by(Execution.run_id, Execution.status)
            ):
                statuses[run_id][status] = n
        runs = [
            m.RunSummary(
                id=r.id,
                created_at=r.created_at,
                task_id=r.task_id,
                job_id=r.job_id,
                label=r.label,
                executions=sum(statuses[r.id].values()),
                statuses=statuses[r.id],
            )
            for r in page
        ]
        return m.RunsPage(runs=runs, next_before=page[-1].id if len(rows) > limit else None)

    def computer_executions(
        self,
        name: str,
        limit: int,
        before: int | None = None,
        status: m.ExecutionStatus | None = None,
    ) -> m.ExecutionsPage:
        """A computer's executions (a forgotten one's too), newest first, in pages."""
        with self._db.reading() as s:
            computer_id = s.scalar(select(Computer.id).where(Computer.name == name))
            if computer_id is None:
                raise NotFound(f"computer {name!r} is not known")
            conditions = [Execution.computer_id == computer_id]
            if before is not None:
                conditions.append(Execution.id < before)
            if status is not None:
                conditions.append(Execution.status == status)
            rows = s.scalars(
                select(Execution).where(*conditions).order_by(Execution.id.desc()).limit(limit + 1)
            ).all()
            page = [views.execution_out(ex) for ex in rows[:limit]]
        more = len(rows) > limit
        return m.ExecutionsPage(executions=page, next_before=page[-1].id if more else None)

    # --- deletions ----------------------------------------------------------------------------

    def delete_task(self, task_id: int) -> str:
        """Delete a task that no job uses and no unfinished execution runs; its name."""
        with self._db.writing() as s:
            task: Task = _get(s, Task, task_id, "task")
            jobs = s.scalars(
                select(Job.name)
                .join(JobTask, JobTask.job_id == Job.id)
                .where(JobTask.task_id == task_id)
                .distinct()
            ).all()
            if jobs:
                raise Conflict(
                    f"task {task_id} ({task.name}) is a step of job(s) {', '.join(sorted(jobs))}:"
                    " delete those jobs first"
                )
            _refuse_unfinished(s, Execution.task_id == task_id, f"task {task_id} ({task.name})")
            s.execute(update(Run).where(Run.task_id == task_id).values(task_id=None))
            s.execute(update(Execution).where(Execution.task_id == task_id).values(task_id=None))
            s.delete(task)
            return str(task.name)

    def delete_job(self, job_id: int) -> str:
        """Delete a job no unfinished execution runs (its tasks stay); its name."""
        with self._db.writing() as s:
            job: Job = _get(s, Job, job_id, "job")
            _refuse_unfinished(s, Execution.job_id == job_id, f"job {job_id} ({job.name})")
            s.execute(update(Run).where(Run.job_id == job_id).values(job_id=None))
            s.execute(update(Execution).where(Execution.job_id == job_id).values(job_id=None))
            s.delete(job)
            return str(job.name)

    def forget_computer(self, name: str) -> None:
        """Forget a computer with no unfinished execution: its credentials go (its agent's next
        registration makes it a new computer), its history stays."""
        with self._db.writing() as s:
            c = s.scalar(
                select(Computer).where(Computer.name == name, Computer.forgotten_at.is_(None))
            )
            if c is None:
                raise NotFound(f"computer {name!r} is not registered")
            _refuse_unfinished(s, Execution.computer_id == c.id, f"computer {name}")
            c.forgotten_at = time.time()
            c.token_sha256 = ""  # no SHA-256 is empty: no token authenticates as it
            c.tickle_key = new_tickle_key()  # the old key tickles nothing any more
            c.task_server_id = None
            c.tickle_state = "unknown"
            c.settings_version = None

    def delete_task_server(self, name: str, force: bool = False) -> int:
        """Delete a task server (its credentials); how many computers it left unassigned.

        One that still serves computers is refused unless `force`: its computers then stay,
        with no task server, until their agents register through another one."""
        clients = self._delete_task_server(name, force)
        if self._callers is not None:
            self._callers.clear()  # after the commit: its token is refused from now on
        return clients

    def _delete_task_server(self, name: str, force: bool) -> int:
        with self._db.writing() as s:
            ts = s.scalar(select(TaskServer).where(TaskServer.name == name))
            if ts is None:
                raise NotFound(f"task server {name!r} is not registered")
            clients = s.scalar(
                select(func.count()).select_from(Computer).where(Computer.task_server_id == ts.id)
            )
            if clients and not force:
                raise Conflict(
                    f"task server {name} still serves {clients} computer(s): move their agents"
                    " to another task server or forget them first, or force the deletion (they"
                    " stay, with no task server, until they register elsewhere)"
                )
            s.execute(
                update(Computer).where(Computer.task_server_id == ts.id).values(task_server_id=None)
            )
            s.delete(ts)
            return int(clients or 0)

    # --- settings ---------------------------------------------------------------------------------

    def settings_reach(self) -> m.SettingsReach:
        """How many agents have the current settings version, and how many take it next."""
        with self._db.reading() as s:
            row = s.get(Settings, 1)
            version = row.version if row is not None else 1
            total, current = s.execute(
                select(
                    func.count(), func.count().filter(Computer.settings_version >= version)
                ).where(Computer.forgotten_at.is_(None))
            ).one()
        return m.SettingsReach(
            version=version, current=int(current), pending=int(total) - int(current)
        )


def _epoch(at: datetime) -> float:
    """Unix seconds of `at`; a time without a zone is UTC (not the server's local time)."""
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


def _refuse_unfinished(s: Session, which: ColumnElement[bool], what: str) -> None:
    runs: Sequence[Any] = s.scalars(
        select(Execution.run_id).where(which, _UNFINISHED).distinct().order_by(Execution.run_id)
    ).all()
    if runs:
        shown = ", ".join(map(str, runs[:10])) + (", ..." if len(runs) > 10 else "")
        raise Conflict(
            f"{what} has unfinished executions (run(s) {shown}): wait until they end or cancel"
            " them first"
        )


def _get(s: Session, table: type[Task] | type[Job], ident: int, what: str) -> Any:
    row = s.get(table, ident)
    if row is None:
        raise NotFound(f"{what} {ident} does not exist")
    return row
