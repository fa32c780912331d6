"""Operator actions, each recorded in the audit with who did it: the API's routes and the web
console both go through here, so the audit cannot miss an action whichever face it came from."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi.concurrency import run_in_threadpool

from tickle import messages as m
from tickle.ns.services.cancel import CancelService
from tickle.ns.services.delivery import DeliveryService
from tickle.ns.services.history import HistoryService
from tickle.ns.services.settings import SettingsService
from tickle.ns.stores.audit import AuditStore
from tickle.ns.stores.catalog import CatalogStore
from tickle.ns.stores.operators import OperatorStore
from tickle.ns.stores.registrations import RegistrationStore
from tickle.serving import on_route_thread

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from tickle.ns.driver import Driver


class OperatorActions:
    """What operators do (run now, rerun, cancel, define, delete, forget, decide on
    registrations, change settings, add operators), audited."""

    def __init__(
        self,
        catalog: CatalogStore,
        delivery: DeliveryService,
        settings: SettingsService,
        operators: OperatorStore,
        audit: AuditStore,
        cancel: CancelService,
        history: HistoryService,
        registrations: RegistrationStore,
    ) -> None:
        self._catalog = catalog
        self._delivery = delivery
        self._settings = settings
        self._operators = operators
        self._audit = audit
        self._cancel = cancel
        self._history = history
        self._registrations = registrations

    async def record(
        self, who: str, action: str, target: str, detail: dict[str, Any] | None = None
    ) -> None:
        """Record an action done elsewhere (a login, a logout)."""
        await on_route_thread(self._audit.record, who, action, target, detail)

    async def run_now(self, who: str, body: m.RunCreate) -> m.RunOut:
        # audited in the run's own transaction: one commit, and the pull of the task server
        # tickled for the run does not queue behind the audit's write
        def audit(conn: Connection | Driver, run: m.RunOut) -> None:
            detail = {
                "computers": body.computers[:20],
                "groups": body.groups[:20],
                "all": body.all_computers,
                "executions": len(run.executions),
                "expires_in_s": body.expires_in_s,
            }
            self._audit.insert(conn, who, "run", f"run {run.id}: {_what(run)}", detail)

        return await self._delivery.run_now(body, audit)

    async def rerun(
        self, who: str, run_id: int, failed: bool, expires_in_s: float | None = None
    ) -> m.RunOut:
        def audit(conn: Connection | Driver, run: m.RunOut) -> None:
            detail = {"failed": failed, "executions": len(run.executions)}
            target = f"run {run.id}: {_what(run)} again (run {run_id})"
            self._audit.insert(conn, who, "run.rerun", target, detail)

        return await self._delivery.rerun(run_id, failed, expires_in_s, audit)

    async def cancel(self, who: str, run_id: int, execution_id: int | None) -> m.CancelOut:
        out = await self._cancel.cancel(run_id, execution_id)
        target = f"run {run_id}" + ("" if execution_id is None else f" execution {execution_id}")
        detail = {"cancelled": len(out.cancelled), "stopping": len(out.stopping)}
        await self.record(who, "run.cancel", target, detail)
        return out

    async def delete_task(self, who: str, task_id: int) -> None:
        await run_in_threadpool(self._history.delete_task, task_id)
        await self.record(who, "task.delete", f"task {task_id}")

    async def delete_job(self, who: str, job_id: int) -> None:
        await run_in_threadpool(self._history.delete_job, job_id)
        await self.record(who, "job.delete", f"job {job_id}")

    async def forget_computer(self, who: str, name: str) -> None:
        await self._history.forget_computer(name)
        await self.record(who, "computer.forget", f"computer {name}")

    async def delete_task_server(self, who: str, name: str, force: bool) -> None:
        await self._history.delete_task_server(name, force)
        await self.record(who, "task_server.delete", f"task server {name}", {"force": force})

    async def decide_registration(
        self, who: str, kind: m.RegistrationKind, name: str, state: m.RegistrationState
    ) -> m.RegistrationOut:
        decided = await run_in_threadpool(self._registrations.decide, kind, name, state)
        verb = "approve" if state == "approved" else "reject"
        await self.record(who, f"{kind}.{verb}", f"{kind} {name}")
        return decided

    async def rekey(self, who: str, kind: m.RegistrationKind, name: str) -> m.Rekeyed:
        rekeyed = await run_in_threadpool(self._registrations.rekey, kind, name)
        await self.record(who, f"{kind}.rekey", f"{kind} {name}")
        return rekeyed

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


def _what(run: m.RunOut) -> str:
    if run.task_id is not None:
        return f"task {run.task_id}"
    if run.job_id is not None:
        return f"job {run.job_id}"
    return f"command {run.label}"
