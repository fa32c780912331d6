"""Tasks and jobs (ordered lists of tasks): the operator's catalog."""

from __future__ import annotations

from fastapi import APIRouter

from tickle import messages as m
from tickle.ns.auth import AdminDep
from tickle.ns.dependencies import CatalogDep

router = APIRouter(tags=["tasks"])


@router.post("/api/tasks", status_code=201, summary="Define a task")
def create_task(body: m.TaskCreate, _: AdminDep, catalog: CatalogDep) -> m.TaskOut:
    return catalog.create_task(body)


@router.get("/api/tasks", summary="List tasks")
def list_tasks(_: AdminDep, catalog: CatalogDep) -> list[m.TaskOut]:
    return catalog.tasks()


@router.post("/api/jobs", status_code=201, summary="Define a job")
def create_job(body: m.JobCreate, _: AdminDep, catalog: CatalogDep) -> m.JobOut:
    return catalog.create_job(body)


@router.get("/api/jobs", summary="List jobs")
def list_jobs(_: AdminDep, catalog: CatalogDep) -> list[m.JobOut]:
    return catalog.jobs()
