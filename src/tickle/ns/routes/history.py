"""Run history and deletions: list runs, a computer's executions; delete tasks, jobs, task
servers, forget computers. Admin token."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from tickle import messages as m
from tickle.ns.auth import OperatorDep
from tickle.ns.dependencies import ActionsDep, HistoryDep
from tickle.ns.stores.history import RunFilter
from tickle.serving import JsonRoute

router = APIRouter(tags=["history"], route_class=JsonRoute)
DbId = Annotated[int, Path(ge=m.DB_INT_MIN, le=m.DB_INT_MAX)]
Limit = Annotated[int, Query(ge=1, le=500, description="at most this many, newest first")]
Before = Annotated[
    int | None,
    Query(
        ge=m.DB_INT_MIN,
        le=m.DB_INT_MAX,
        description="the page after: ids below this one (the last page's next_before)",
    ),
]
StatusQuery = Annotated[m.ExecutionStatus | None, Query(description="with an execution in it")]


@router.get(
    "/api/runs",
    summary="List runs, newest first",
    description="Filters narrow the list: status (runs with an execution in that status), "
    "task_id, job_id, computer (runs with an execution on it), since/until (creation time, "
    "ISO 8601 or Unix seconds). Pages: `limit`, then `before=<next_before>`.",
)
def list_runs(
    _: OperatorDep,
    history: HistoryDep,
    status: StatusQuery = None,
    task_id: Annotated[int | None, Query(ge=m.DB_INT_MIN, le=m.DB_INT_MAX)] = None,
    job_id: Annotated[int | None, Query(ge=m.DB_INT_MIN, le=m.DB_INT_MAX)] = None,
    computer: Annotated[str | None, Query(max_length=64)] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: Limit = 50,
    before: Before = None,
) -> m.RunsPage:
    where = RunFilter(status, task_id, job_id, computer, since, until)
    return history.runs(where, limit, before)


@router.get(
    "/api/computers/{name}/executions",
    summary="A computer's executions, newest first",
    description="A forgotten computer's history too. Pages: `limit`, then `before=<next_before>`.",
)
def computer_executions(
    name: Annotated[str, Path(max_length=64)],
    _: OperatorDep,
    history: HistoryDep,
    status: StatusQuery = None,
    limit: Limit = 50,
    before: Before = None,
) -> m.ExecutionsPage:
    return history.computer_executions(name, limit, before, status)


@router.delete(
    "/api/tasks/{task_id}",
    status_code=204,
    summary="Delete a task",
    description="Refused (409) while a job has it as a step or an execution of it is "
    "unfinished. Its runs stay in the history, under the task's name.",
)
async def delete_task(task_id: DbId, who: OperatorDep, actions: ActionsDep) -> Response:
    await actions.delete_task(who, task_id)
    return Response(status_code=204)


@router.delete(
    "/api/jobs/{job_id}",
    status_code=204,
    summary="Delete a job",
    description="Refused (409) while an execution of it is unfinished. Its tasks stay; its "
    "runs stay in the history, under the job's name.",
)
async def delete_job(job_id: DbId, who: OperatorDep, actions: ActionsDep) -> Response:
    await actions.delete_job(who, job_id)
    return Response(status_code=204)


@router.delete(
    "/api/computers/{name}",
    status_code=204,
    summary="Forget a computer",
    description="Its agent's credentials go: its next contact is refused and it registers "
    "again as a new computer. Its executions stay in the history. Refused (409) while one of "
    "its executions is unfinished.",
)
async def forget_computer(
    name: Annotated[str, Path(max_length=64)],
    who: OperatorDep,
    actions: ActionsDep,
) -> Response:
    await actions.forget_computer(who, name)
    return Response(status_code=204)


@router.delete(
    "/api/task-servers/{name}",
    status_code=204,
    summary="Delete a task server",
    description="Its credentials go. Refused (409) while it serves computers, unless "
    "force=true: they stay, with no task server (not tickled, their work waits), until their "
    "agents register through another task server. A task server still running registers "
    "again at its next call to the NS: stop it first.",
)
async def delete_task_server(
    name: Annotated[str, Path(max_length=64)],
    who: OperatorDep,
    actions: ActionsDep,
    force: Annotated[bool, Query(description="delete even while it serves computers")] = False,
) -> Response:
    await actions.delete_task_server(who, name, force)
    return Response(status_code=204)


@router.get(
    "/api/settings/reach",
    summary="How far the settings version reached",
    description="current: agents whose contacts report the current version; pending: those "
    "that take it at their next contact.",
)
def settings_reach(_: OperatorDep, history: HistoryDep) -> m.SettingsReach:
    return history.settings_reach()
