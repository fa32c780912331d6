"""The newest runs with their executions counted per status: the web console's Runs page and
`GET /api/runs`, until the full run history (issue 12: filters, paging) replaces this list."""

from __future__ import annotations

from sqlalchemy import func, select

from tickle import messages as m
from tickle.ns.database import Database
from tickle.ns.models import Execution, Job, Run, Task


class RunListStore:
    """The newest runs, counted per status, in the NS database."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def recent(self, limit: int = 50) -> list[m.RunSummary]:
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
            m.RunSummary(
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
