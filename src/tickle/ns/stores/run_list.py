"""The newest runs with their executions counted per status: the web console's Runs page and
`GET /api/runs`, until the full run history (issue 12: filters, paging) replaces this list. Also
the lean read of one run's grid that the console's live stream repeats every tick."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select

from tickle import messages as m
from tickle.ns.database import Database
from tickle.ns.models import Computer, Execution, Job, Run, Task

# the execution column holding each timeline step's time, in the timeline's order
_STEP_COLUMNS = [
    getattr(Execution, "cached_at_ts" if step == "cached_at_ts" else f"{step}_at")
    for step in m.TIMELINE_STEPS
]


@dataclass(frozen=True, slots=True)
class GridRow:
    """One execution of a run as the live grid shows it."""

    id: int
    computer: str
    status: str
    via: str | None
    times: tuple[float | None, ...]  # one per timeline step


class RunListStore:
    """The newest runs, counted per status, in the NS database."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def recent(self, limit: int = 50) -> list[m.RunListItem]:
        """The newest `limit` runs, newest first."""
        with self._db.reading() as s:
            runs = s.execute(
                select(Run.id, Run.created_at, Run.task_id, Run.job_id, Task.name, Job.name)
                .outerjoin(Task, Run.task_id == Task.id)
                .outerjoin(Job, Run.job_id == Job.id)
                .order_by(Run.id.desc())
                .limit(limit)
            ).all()
            counts: dict[int, dict[str, int]] = {r[0]: {} for r in runs}
            rows = s.execute(
                select(Execution.run_id, Execution.status, func.count())
                .where(Execution.run_id.in_(counts))
                .group_by(Execution.run_id, Execution.status)
            )
            for run_id, status, n in rows:
                counts[run_id][status] = int(n)
        return [
            m.RunListItem(
                id=run_id,
                created_at=created_at,
                task_id=task_id,
                job_id=job_id,
                what=f"task {task}" if task_id is not None else f"job {job}",
                total=sum(counts[run_id].values()),
                statuses=counts[run_id],
            )
            for run_id, created_at, task_id, job_id, task, job in runs
        ]

    def grid(self, run_id: int) -> list[GridRow]:
        """The run's executions with their step times, read column by column (no ORM objects:
        the live stream reads a run of 1,000 computers every tick)."""
        with self._db.reading() as s:
            rows = s.execute(
                select(Execution.id, Computer.name, Execution.status, Execution.via, *_STEP_COLUMNS)
                .join(Computer, Execution.computer_id == Computer.id)
                .where(Execution.run_id == run_id)
                .order_by(Execution.id)
            )
            return [GridRow(r[0], r[1], r[2], r[3], tuple(r[4:])) for r in rows]
