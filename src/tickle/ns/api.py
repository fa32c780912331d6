"""The notification server's HTTP API (FastAPI): the app, its OpenAPI tags and error statuses.

The routes live in `routes/` (one router per tag) and call the services (`services/`), which the
app holds on `app.state.services`. Routes that only touch the database are plain functions
(FastAPI runs them in its threadpool); routes whose service also talks to the tickle server are
coroutines, because the tickle server lives on the event loop.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tickle.metrics import ComponentMetrics
from tickle.ns import console
from tickle.ns.auth import is_known_token
from tickle.ns.credentials import token_sha256
from tickle.ns.errors import STATUS
from tickle.ns.fast_path import TaskServerFastPath
from tickle.ns.routes import ROUTERS
from tickle.ns.routes.task_server import REGISTRATIONS
from tickle.ns.services import Services
from tickle.ns.settings import NsSettings
from tickle.ns.stores import Stores
from tickle.ns.tickle_server import TickleServer
from tickle.serving import BodyLimits, ClockHeaders

TAGS = [
    {"name": "health", "description": "Liveness and Prometheus metrics (no credentials)."},
    {"name": "tasks", "description": "Tasks and jobs (ordered lists of tasks). Operator token."},
    {"name": "runs", "description": "Run now, and watch runs and executions. Operator token."},
    {
        "name": "history",
        "description": "List runs and a computer's executions; delete tasks, jobs and task "
        "servers, forget computers; the settings' reach. Admin token.",
    },
    {
        "name": "inventory",
        "description": "Task servers, computers, and what this server is. Operator token.",
    },
    {
        "name": "approval",
        "description": "Who may register: approve or reject new agents and task servers "
        "(registration_approval = manual), re-key a name for a new identity. Admin token.",
    },
    {"name": "settings", "description": "Central settings handed down to task servers and agents."},
    {
        "name": "operators",
        "description": "Operator accounts and the audit of what operators did. Admin token.",
    },
    {
        "name": "task-server",
        "description": "Routes for task servers: registration, the pull of work, status events. "
        "Task-server token (registration: the task servers' enrollment secret).",
    },
]


def create_app(
    settings: NsSettings,
    stores: Stores,
    tickle_server: TickleServer,
    metrics: ComponentMetrics,
) -> FastAPI:
    """Build the NS API over open stores and a started (or startable) tickle server.

    `settings` carries its secrets (see `NsSettings.with_secrets`).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.started_at = time.time()  # when it starts serving, for GET /api/about
        yield

    app = FastAPI(
        title="Tickle Notification Server",
        version="1",
        description="Operators define tasks and jobs and run them now on computers; the NS tickles "
        "the task servers of those computers, which pull the work, tickle their agents and send "
        "status events back. Every route but health and metrics needs a bearer token.",
        openapi_tags=TAGS,
        lifespan=lifespan,
        docs_url=None,  # served by the console's docs module, from the NS's own assets
        redoc_url=None,
    )
    app.state.started_at = time.time()  # served without lifespan events: when it was built
    app.state.services = Services.build(settings, stores, tickle_server, metrics)
    app.state.admin_token_sha256 = token_sha256(settings.admin_token or "")
    for refusal in STATUS:
        app.add_exception_handler(refusal, _refused)
    for router in ROUTERS:
        app.include_router(router)
    console.mount(app, settings.console_session_s)
    # inside the body limit and the clock: a task server's pull and events skip FastAPI's work
    app.add_middleware(TaskServerFastPath, services=app.state.services)
    app.add_middleware(
        BodyLimits,
        limits=settings,
        metrics=metrics,
        registrations=REGISTRATIONS,
        known_token=functools.partial(is_known_token, app),
    )
    app.add_middleware(ClockHeaders)  # outermost: the arrival before the body limit reads
    return app


async def _refused(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=STATUS[type(exc)])
