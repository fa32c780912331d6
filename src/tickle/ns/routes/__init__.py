"""The NS API's routes: one router per OpenAPI tag, listed in the order the document shows them."""

from __future__ import annotations

from fastapi import APIRouter

from tickle.ns.routes import (
    health,
    inventory,
    operators,
    run_list,
    runs,
    settings,
    task_server,
    tasks,
)

ROUTERS: tuple[APIRouter, ...] = (
    health.router,
    tasks.router,
    runs.router,
    run_list.router,
    inventory.router,
    settings.router,
    operators.router,
    task_server.router,
)
