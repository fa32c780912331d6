"""Cancel a run, or one of its executions (the operator's side of stopping work)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from tickle import messages as m
from tickle.ns.auth import OperatorDep
from tickle.ns.dependencies import ActionsDep, ServicesDep
from tickle.ns.routes.runs import DbId
from tickle.ns.services.cancel import CancelService

router = APIRouter(tags=["runs"])


async def get_cancel(services: ServicesDep) -> CancelService:
    return services.cancel


CancelDep = Annotated[CancelService, Depends(get_cancel)]


@router.post(
    "/api/runs/{run_id}/cancel",
    summary="Cancel a run, or one of its executions",
    description="An execution no agent pulled yet ends `cancelled` at once and never starts "
    "(its task server drops it); one an agent pulled is stopped by that agent, with every "
    "process it started, at its next contact with its task server (a tickle makes that at "
    "once), and ends as the agent reports it. Executions that had ended are left as they were.",
)
async def cancel_run(
    run_id: DbId,
    who: OperatorDep,
    cancel: CancelDep,
    actions: ActionsDep,
    execution_id: Annotated[
        int | None,
        Query(ge=m.DB_INT_MIN, le=m.DB_INT_MAX, description="Cancel only this execution"),
    ] = None,
) -> m.CancelOut:
    out = await cancel.cancel(run_id, execution_id)
    target = f"run {run_id}" + ("" if execution_id is None else f" execution {execution_id}")
    detail = {"cancelled": len(out.cancelled), "stopping": len(out.stopping)}
    await actions.record(who, "run.cancel", target, detail)
    return out
