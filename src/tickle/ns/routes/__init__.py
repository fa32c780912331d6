"""The NS API's routes: one router per OpenAPI tag, listed in the order the document shows them."""

from __future__ import annotations

from fastapi import APIRouter

from tickle.ns.routes import (
    approval,
    cancel,
    health,
    history,
    inventory,
    operators,
    output,
    runs,
    settings,
    task_server,
    tasks,
)

ROUTERS: tuple[APIRouter, ...] = (
    health.router,
    tasks.router,
    runs.router,
    history.router,
    cancel.router,
    output.router,
    inventory.router,
    approval.router,
    settings.router,
    operators.router,
    task_server.router,
)
