"""Cancel a run, or one of its executions, and rerun a run (the operator's side of stopping
work and trying again)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from tickle import messages as m
from tickle.ns.auth import OperatorDep
from tickle.ns.dependencies import ActionsDep
from tickle.ns.routes.runs import DbId
from tickle.serving import JsonRoute

router = APIRouter(tags=["runs"], route_class=JsonRoute)


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
    actions: ActionsDep,
    execution_id: Annotated[
        int | None,
        Query(ge=m.DB_INT_MIN, le=m.DB_INT_MAX, description="Cancel only this execution"),
    ] = None,
) -> m.CancelOut:
    return await actions.cancel(who, run_id, execution_id)


@router.post(
    "/api/runs/{run_id}/rerun",
    status_code=201,
    summary="Run a run's task, job or command again",
    description="A new run of the same task, job or ad-hoc command on the run's computers; "
    "with failed=true only on those whose execution failed, timed out, was interrupted, "
    "cancelled, expired or lost (409 when there is none). Forgotten computers are left out.",
)
async def rerun(
    run_id: DbId,
    who: OperatorDep,
    actions: ActionsDep,
    failed: Annotated[bool, Query(description="only the computers that did not succeed")] = False,
    expires_in_s: Annotated[
        float | None,
        Query(gt=0, le=m.RUN_EXPIRY_MAX_S, description="executions not started by then expire"),
    ] = None,
) -> m.RunOut:
    return await actions.rerun(who, run_id, failed, expires_in_s)
