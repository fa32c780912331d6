"""Task servers, computers, and what this notification server is (the operator's view)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from tickle import messages as m
from tickle.ns.auth import OperatorDep
from tickle.ns.dependencies import InventoryDep

router = APIRouter(tags=["inventory"])


@router.get("/api/task-servers", summary="Task servers and reachability")
def list_task_servers(_: OperatorDep, inventory: InventoryDep) -> list[m.TaskServerOut]:
    return inventory.task_servers()


@router.get("/api/computers", summary="Computers, tickle state and NAT")
def list_computers(_: OperatorDep, inventory: InventoryDep) -> list[m.ComputerOut]:
    return inventory.computers()


@router.get(
    "/api/about",
    summary="What this notification server is",
    description="Its version, the database it uses (SQLite file or PostgreSQL "
    "host:port/dbname, never credentials), the schema revision stamped there, and whether "
    "this process is the active tickle dispatcher now.",
)
async def get_about(_: OperatorDep, inventory: InventoryDep, request: Request) -> m.About:
    return await inventory.about(request.app.state.started_at)
