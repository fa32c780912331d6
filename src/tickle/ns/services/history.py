"""The history service: run history, deletions and the settings' reach — telling the tickle server
when a deletion changes whom it tickles."""

from __future__ import annotations

import logging

from fastapi.concurrency import run_in_threadpool

from tickle import messages as m
from tickle.ns.stores.history import HistoryStore, RunFilter
from tickle.ns.tickle_server import TickleServer

log = logging.getLogger(__name__)


class HistoryService:
    """Run history and deletions, over the history store and the tickle server."""

    def __init__(self, store: HistoryStore, tickle_server: TickleServer) -> None:
        self._store = store
        self._tickle_server = tickle_server

    def runs(self, where: RunFilter, limit: int, before: int | None) -> m.RunsPage:
        return self._store.runs(where, limit, before)

    def computer_executions(
        self, name: str, limit: int, before: int | None, status: m.ExecutionStatus | None
    ) -> m.ExecutionsPage:
        return self._store.computer_executions(name, limit, before, status)

    def delete_task(self, task_id: int) -> None:
        name = self._store.delete_task(task_id)
        log.info("task %d (%s) deleted", task_id, name)

    def delete_job(self, job_id: int) -> None:
        name = self._store.delete_job(job_id)
        log.info("job %d (%s) deleted", job_id, name)

    async def forget_computer(self, name: str) -> None:
        await run_in_threadpool(self._store.forget_computer, name)
        log.info("computer %s forgotten", name)

    async def delete_task_server(self, name: str, force: bool) -> None:
        left = await run_in_threadpool(self._store.delete_task_server, name, force)
        self._tickle_server.notify()  # it no longer tickles the deleted task server
        log.info("task server %s deleted (%d computer(s) left with no task server)", name, left)

    def settings_reach(self) -> m.SettingsReach:
        return self._store.settings_reach()
