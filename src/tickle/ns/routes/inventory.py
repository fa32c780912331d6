"""Task servers, computers, and what this notification server is (the operator's view)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from tickle import messages as m
from tickle.ns.auth import OperatorDep
from tickle.ns.dependencies import InventoryDep
from tickle.serving import JsonRoute

router = APIRouter(tags=["inventory"], route_class=JsonRoute)


@router.get("/api/task-servers", summary="Task servers and reachability")
def list_task_servers(_: OperatorDep, inventory: InventoryDep) -> list[m.TaskServerOut]:
    return inventory.task_servers()


@router.get(
    "/api/computers",
    summary="Computers: liveness, settings version, tickle state and NAT",
    description="A computer is offline when it has not been heard from (poll, pull, event, "
    "registration) within offline_intervals x its Task Request Interval + offline_slack_s "
    "(NS settings; default 2 x interval + 60 s).",
)
def list_computers(
    _: OperatorDep,
    inventory: InventoryDep,
    liveness: Annotated[
        m.Liveness | None, Query(description="only the online or only the offline computers")
    ] = None,
) -> list[m.ComputerOut]:
    return inventory.computers(liveness)


@router.get(
    "/api/about",
    summary="What this notification server is",
    description="Its version, the database it uses (SQLite file or PostgreSQL "
    "host:port/dbname, never credentials), the schema revision stamped there, and whether "
    "this process is the active tickle dispatcher now.",
)
async def get_about(_: OperatorDep, inventory: InventoryDep, request: Request) -> m.About:
    return await inventory.about(request.app.state.started_at)
