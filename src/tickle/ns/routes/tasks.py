"""Tasks and jobs (ordered lists of tasks): the operator's catalog."""

from __future__ import annotations

from fastapi import APIRouter

from tickle import messages as m
from tickle.ns.auth import OperatorDep
from tickle.ns.dependencies import ActionsDep, CatalogDep
from tickle.serving import JsonRoute

router = APIRouter(tags=["tasks"], route_class=JsonRoute)


@router.post("/api/tasks", status_code=201, summary="Define a task")
async def create_task(body: m.TaskCreate, who: OperatorDep, actions: ActionsDep) -> m.TaskOut:
    return await actions.define_task(who, body)


@router.get("/api/tasks", summary="List tasks")
def list_tasks(_: OperatorDep, catalog: CatalogDep) -> list[m.TaskOut]:
    return catalog.tasks()


@router.post("/api/jobs", status_code=201, summary="Define a job")
async def create_job(body: m.JobCreate, who: OperatorDep, actions: ActionsDep) -> m.JobOut:
    return await actions.define_job(who, body)


@router.get("/api/jobs", summary="List jobs")
def list_jobs(_: OperatorDep, catalog: CatalogDep) -> list[m.JobOut]:
    return catalog.jobs()
