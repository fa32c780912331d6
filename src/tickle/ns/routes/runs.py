"""Run now, and watch runs and executions (the operator's side of delivery)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from tickle import messages as m
from tickle.ns.auth import OperatorDep
from tickle.ns.dependencies import ActionsDep, DeliveryDep
from tickle.serving import JsonRoute

router = APIRouter(tags=["runs"], route_class=JsonRoute)
# an id in a path fits the database's INTEGER column (a larger one crashed the query)
DbId = Annotated[int, Path(ge=m.DB_INT_MIN, le=m.DB_INT_MAX)]


@router.post(
    "/api/runs",
    status_code=201,
    summary="Run a task or job now",
    description="Creates one pending execution per computer (named, or member of a named "
    "group) and tickles their task servers at once. An unknown computer is a 404 naming it.",
)
async def run_now(body: m.RunCreate, who: OperatorDep, actions: ActionsDep) -> m.RunOut:
    return await actions.run_now(who, body)


@router.get("/api/runs/{run_id}", summary="A run and the status of its executions")
def get_run(run_id: DbId, _: OperatorDep, delivery: DeliveryDep) -> m.RunOut:
    return delivery.run(run_id)


@router.get(
    "/api/executions/{execution_id}",
    summary="An execution with its timeline",
    description="The timeline lists created, tickle_sent, ts_pulled, agent_tickled, "
    "agent_pulled, started, finished, cached_at_ts and recorded, in that order.",
)
def get_execution(execution_id: DbId, _: OperatorDep, delivery: DeliveryDep) -> m.ExecutionOut:
    return delivery.execution(execution_id)
