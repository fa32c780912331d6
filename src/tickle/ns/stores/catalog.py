"""The catalog store: the tasks and jobs (ordered lists of tasks) operators define."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from tickle import messages as m
from tickle.ns import views
from tickle.ns.database import Database
from tickle.ns.errors import Conflict, NotFound
from tickle.ns.models import Job, JobTask, Task


class CatalogStore:
    """Tasks and jobs in the NS database."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def create_task(self, body: m.TaskCreate) -> m.TaskOut:
        """Define a task; its name must be new."""
        try:
            with self._db.writing() as s:
                if s.scalar(select(Task.id).where(Task.name == body.name)) is not None:
                    raise Conflict(f"task {body.name!r} exists")
                t = Task(
                    name=body.name,
                    command=body.command,
                    script=body.script,
                    timeout_s=body.timeout_s,
                )
                s.add(t)
                s.flush()
                return views.task_out(t)
        except IntegrityError:
            raise Conflict(f"task {body.name!r} exists") from None

    def tasks(self) -> list[m.TaskOut]:
        with self._db.reading() as s:
            return [views.task_out(t) for t in s.scalars(select(Task).order_by(Task.id))]

    def create_job(self, body: m.JobCreate) -> m.JobOut:
        """Define a job of existing tasks; its name must be new."""
        try:
            with self._db.writing() as s:
                if s.scalar(select(Job.id).where(Job.name == body.name)) is not None:
                    raise Conflict(f"job {body.name!r} exists")
                known = set(s.scalars(select(Task.id).where(Task.id.in_(body.task_ids))))
                missing = [i for i in body.task_ids if i not in known]
                if missing:
                    raise NotFound(f"unknown task id(s): {', '.join(map(str, missing))}")
                job = Job(
                    name=body.name,
                    tasks=[JobTask(position=i, task_id=t) for i, t in enumerate(body.task_ids)],
                )
                s.add(job)
                s.flush()
                return m.JobOut(id=job.id, name=job.name, task_ids=list(body.task_ids))
        except IntegrityError:
            raise Conflict(f"job {body.name!r} exists") from None

    def jobs(self) -> list[m.JobOut]:
        with self._db.reading() as s:
            return [views.job_out(j) for j in s.scalars(select(Job).order_by(Job.id))]
