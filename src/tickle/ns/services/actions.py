"""Operator actions, each recorded in the audit with who did it: the API's routes and the web
console both go through here, so the audit cannot miss an action whichever face it came from."""

from __future__ import annotations

from typing import Any

from fastapi.concurrency import run_in_threadpool

from tickle import messages as m
from tickle.ns.services.delivery import DeliveryService
from tickle.ns.services.settings import SettingsService
from tickle.ns.stores.audit import AuditStore
from tickle.ns.stores.catalog import CatalogStore
from tickle.ns.stores.operators import OperatorStore


class OperatorActions:
    """What operators do (run now, define, change settings, add operators), audited."""

    def __init__(
        self,
        catalog: CatalogStore,
        delivery: DeliveryService,
        settings: SettingsService,
        operators: OperatorStore,
        audit: AuditStore,
    ) -> None:
        self._catalog = catalog
        self._delivery = delivery
        self._settings = settings
        self._operators = operators
        self._audit = audit

    async def record(
        self, who: str, action: str, target: str, detail: dict[str, Any] | None = None
    ) -> None:
        """Record an action done elsewhere (a login, a logout)."""
        await run_in_threadpool(self._audit.record, who, action, target, detail)

    async def run_now(self, who: str, body: m.RunCreate) -> m.RunOut:
        run = await self._delivery.run_now(body)
        what = f"task {body.task_id}" if body.task_id is not None else f"job {body.job_id}"
        detail = {
            "computers": body.computers[:20],
            "groups": body.groups[:20],
            "executions": len(run.executions),
        }
        await self.record(who, "run", f"run {run.id}: {what}", detail)
        return run

    async def define_task(self, who: str, body: m.TaskCreate) -> m.TaskOut:
        task = await run_in_threadpool(self._catalog.create_task, body)
        await self.record(
            who, "task.define", f"task {task.id} {task.name}", {"timeout_s": task.timeout_s}
        )
        return task

    async def define_job(self, who: str, body: m.JobCreate) -> m.JobOut:
        job = await run_in_threadpool(self._catalog.create_job, body)
        await self.record(who, "job.define", f"job {job.id} {job.name}", {"task_ids": job.task_ids})
        return job

    async def update_settings(self, who: str, body: m.SettingsUpdate) -> m.SettingsOut:
        before = await run_in_threadpool(self._settings.settings)
        after = await self._settings.update(body)
        changes = {
            name: [getattr(before, name), value]
            for name, value in body.model_dump(exclude_none=True).items()
            if getattr(before, name) != value
        }
        await self.record(who, "settings", f"settings version {after.version}", changes)
        return after

    async def add_operator(self, who: str, body: m.OperatorCreate) -> m.OperatorCredentials:
        creds = await run_in_threadpool(self._operators.add, body)
        await self.record(who, "operator.add", f"operator {creds.name}")
        return creds
