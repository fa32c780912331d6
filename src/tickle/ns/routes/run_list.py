"""The newest runs, counted per status (a minimal list for the web console; the full run history
with filters and paging is issue 12's and replaces this route)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from tickle import messages as m
from tickle.ns.auth import OperatorDep
from tickle.ns.dependencies import RunListDep

router = APIRouter(tags=["runs"])


@router.get("/api/runs", summary="The newest runs, counted per status")
def list_runs(
    _: OperatorDep, run_list: RunListDep, limit: Annotated[int, Query(ge=1, le=500)] = 50
) -> list[m.RunSummary]:
    return run_list.recent(limit)
