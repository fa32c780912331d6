"""The output of an execution's steps, as its agent kept it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from tickle import messages as m
from tickle.ns.auth import OperatorDep
from tickle.ns.dependencies import ServicesDep
from tickle.ns.routes.runs import DbId
from tickle.ns.stores.output import OutputStore
from tickle.serving import JsonRoute

router = APIRouter(tags=["runs"], route_class=JsonRoute)


async def get_output(services: ServicesDep) -> OutputStore:
    return services.output


OutputDep = Annotated[OutputStore, Depends(get_output)]


@router.get(
    "/api/executions/{execution_id}/output",
    summary="The output of an execution's steps",
    description="stdout and stderr of each step, as the agent kept them: up to its "
    "output_max_bytes per step; beyond it the head and the tail, with a line saying how many "
    "bytes were cut between them. A step that did not run (yet) is left out.",
)
def get_execution_output(
    execution_id: DbId,
    _: OperatorDep,
    output: OutputDep,
    step: Annotated[int | None, Query(ge=0, le=1000, description="Only this step")] = None,
) -> m.ExecutionOutputOut:
    return output.output(execution_id, step)
