"""The notification server's HTTP API (FastAPI): the operator's routes and the task servers' routes.

Handlers that only touch the database are plain functions (FastAPI runs them in its threadpool);
handlers that also talk to the tickle server are coroutines, because the tickle server lives on the
event loop, and they run their database work in the threadpool.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import FastAPI, HTTPException, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from tickle import messages as m
from tickle import wire
from tickle.metrics import ComponentMetrics
from tickle.ns.about import about
from tickle.ns.auth import AdminDep, StoresDep, TaskServerDep
from tickle.ns.credentials import token_sha256
from tickle.ns.errors import Conflict, Forbidden, NotFound
from tickle.ns.settings import NsSettings
from tickle.ns.stores import Stores
from tickle.ns.tickle_server import TickleServer

log = logging.getLogger(__name__)

# an id in a path fits the database's INTEGER column (a larger one crashed the query)
DbId = Annotated[int, Path(ge=m.DB_INT_MIN, le=m.DB_INT_MAX)]
TsPullViaQuery = Annotated[
    m.TsPullVia,
    Query(
        description="what made the task server pull: tickle (an NS tickle; only this "
        "acknowledges it), check (its periodic check, or on its own, e.g. after an agent "
        "registered), start (at its start). Default tickle: a task server of an older version "
        "sends none and its pulls acknowledge as before."
    ),
]

TAGS = [
    {"name": "health", "description": "Liveness and Prometheus metrics (no credentials)."},
    {"name": "tasks", "description": "Tasks and jobs (ordered lists of tasks). Admin token."},
    {"name": "runs", "description": "Run now, and watch runs and executions. Admin token."},
    {
        "name": "inventory",
        "description": "Task servers, computers, and what this server is. Admin token.",
    },
    {"name": "settings", "description": "Central settings handed down to task servers and agents."},
    {
        "name": "task-server",
        "description": "Routes for task servers: registration, the pull of work, status events. "
        "Task-server token (registration: the enrollment secret).",
    },
]


def create_app(
    settings: NsSettings,
    stores: Stores,
    tickle_server: TickleServer,
    metrics: ComponentMetrics,
) -> FastAPI:
    """Build the NS API over open stores and a started (or startable) tickle server.

    An unset admin token or enrollment secret is read from (or generated into) the state dir.
    """
    settings = settings.with_secrets()
    admin_token, enrollment_secret = settings.admin_token or "", settings.enrollment_secret or ""

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
    )
    app.state.settings = settings
    app.state.started_at = time.time()  # served without lifespan events: when it was built
    app.state.stores = stores
    app.state.admin_token_sha256 = token_sha256(admin_token)

    _error_handlers(app)

    @app.get("/health", tags=["health"], summary="Liveness")
    def health() -> m.Health:
        return m.Health(component="ns")

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics")
    def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    # --- operator: tasks and jobs --------------------------------------------------------------

    @app.post("/api/tasks", tags=["tasks"], status_code=201, summary="Define a task")
    def create_task(body: m.TaskCreate, _: AdminDep, st: StoresDep) -> m.TaskOut:
        return st.catalog.create_task(body)

    @app.get("/api/tasks", tags=["tasks"], summary="List tasks")
    def list_tasks(_: AdminDep, st: StoresDep) -> list[m.TaskOut]:
        return st.catalog.tasks()

    @app.post("/api/jobs", tags=["tasks"], status_code=201, summary="Define a job")
    def create_job(body: m.JobCreate, _: AdminDep, st: StoresDep) -> m.JobOut:
        return st.catalog.create_job(body)

    @app.get("/api/jobs", tags=["tasks"], summary="List jobs")
    def list_jobs(_: AdminDep, st: StoresDep) -> list[m.JobOut]:
        return st.catalog.jobs()

    # --- operator: run now and progress --------------------------------------------------------

    @app.post(
        "/api/runs",
        tags=["runs"],
        status_code=201,
        summary="Run a task or job now",
        description="Creates one pending execution per computer (named, or member of a named "
        "group) and tickles their task servers at once. An unknown computer is a 404 naming it.",
    )
    async def run_now(body: m.RunCreate, _: AdminDep, st: StoresDep) -> m.RunOut:
        run = await run_in_threadpool(st.delivery.create_run, body)
        tickle_server.notify()  # after the commit, so the task server's pull sees the work
        log.info("run %d: %d execution(s)", run.id, len(run.executions))
        return run

    @app.get("/api/runs/{run_id}", tags=["runs"], summary="A run and the status of its executions")
    def get_run(run_id: DbId, _: AdminDep, st: StoresDep) -> m.RunOut:
        return st.delivery.run(run_id)

    @app.get(
        "/api/executions/{execution_id}",
        tags=["runs"],
        summary="An execution with its timeline",
        description="The timeline lists created, tickle_sent, ts_pulled, agent_tickled, "
        "agent_pulled, started, finished, cached_at_ts and recorded, in that order.",
    )
    def get_execution(execution_id: DbId, _: AdminDep, st: StoresDep) -> m.ExecutionOut:
        return st.delivery.execution(execution_id)

    # --- operator: inventory and settings ------------------------------------------------------

    @app.get("/api/task-servers", tags=["inventory"], summary="Task servers and reachability")
    def list_task_servers(_: AdminDep, st: StoresDep) -> list[m.TaskServerOut]:
        return st.inventory.task_servers()

    @app.get("/api/computers", tags=["inventory"], summary="Computers, tickle state and NAT")
    def list_computers(_: AdminDep, st: StoresDep) -> list[m.ComputerOut]:
        return st.inventory.computers()

    @app.get(
        "/api/about",
        tags=["inventory"],
        summary="What this notification server is",
        description="Its version, the database it uses (SQLite file or PostgreSQL "
        "host:port/dbname, never credentials), the schema revision stamped there, and whether "
        "this process is the active tickle dispatcher now.",
    )
    async def get_about(_: AdminDep, st: StoresDep, request: Request) -> m.About:
        # the dispatcher role lives on the event loop; the schema revision is a database read
        active = tickle_server.dispatcher_active
        return await run_in_threadpool(about, st.database, active, request.app.state.started_at)

    @app.get("/api/settings", tags=["settings"], summary="Central settings")
    def get_settings(_: AdminDep, st: StoresDep) -> m.SettingsOut:
        return st.settings.settings()

    @app.put(
        "/api/settings",
        tags=["settings"],
        summary="Change central settings",
        description="Bumps the version and sends a settings tickle to every task server.",
    )
    async def put_settings(body: m.SettingsUpdate, _: AdminDep, st: StoresDep) -> m.SettingsOut:
        out = await run_in_threadpool(st.settings.update_settings, body)
        tickle_server.notify()  # its pass sees the new version and sends settings tickles
        log.info("settings version %d", out.version)
        return out

    # --- task servers --------------------------------------------------------------------------

    @app.post(
        "/api/ts/register",
        tags=["task-server"],
        summary="Register a task server",
        description="Authenticated by the enrollment secret in the body. Re-registering a name "
        "rotates its token and tickle key.",
    )
    async def register_task_server(
        body: m.TaskServerRegister, st: StoresDep
    ) -> m.TaskServerCredentials:
        if not hmac.compare_digest(body.enrollment_secret.encode(), enrollment_secret.encode()):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "wrong enrollment_secret")
        creds = await run_in_threadpool(st.inventory.register_task_server, body, settings.ns_id)
        tickle_server.notify()  # refresh its key and address in the tickle server
        log.info("task server %s registered (tickles to %s:%d)", body.name, body.tickle_host,
                 body.tickle_port)  # fmt: skip
        return creds

    @app.post(
        "/api/ts/agents/register",
        tags=["task-server"],
        summary="Register an agent with the calling task server",
        description="Moves the computer to the calling task server; re-registering rotates its "
        "credentials.",
    )
    async def register_agent(
        body: m.AgentRegistration, ts: TaskServerDep, st: StoresDep
    ) -> m.AgentCredentials:
        creds = await run_in_threadpool(st.inventory.register_agent, ts, body)
        tickle_server.notify()  # work pending for a computer that moved goes to its new TS
        return creds

    @app.get("/api/ts/clients", tags=["task-server"], summary="The calling task server's clients")
    def list_clients(ts: TaskServerDep, st: StoresDep) -> list[m.ClientInfo]:
        return st.inventory.clients(ts)

    @app.get(
        "/api/ts/work",
        tags=["task-server"],
        summary="Pull work",
        description="Every unfinished execution of the calling task server's clients. "
        "A pull with via=tickle acknowledges the tasks tickle; any pull sets last_pull_at.",
    )
    async def pull_work(
        ts: TaskServerDep, st: StoresDep, via: TsPullViaQuery = "tickle"
    ) -> m.WorkOut:
        now = time.time()
        if via == "tickle":
            # only a pull the tickle caused proves the task server tickle-reachable; a check
            # does not (the tickle may have been dropped). Ack before reading: work committed
            # after this point gets a tickle of its own.
            tickle_server.ack(ts.name, wire.Kind.TASKS)
        work = await run_in_threadpool(st.delivery.pull_work, ts, now, via)
        metrics.pulls.labels(via=via).inc()
        return work

    @app.get(
        "/api/ts/settings",
        tags=["task-server"],
        summary="Pull settings",
        description="A pull with via=tickle acknowledges the settings tickle.",
    )
    async def pull_settings(
        ts: TaskServerDep, st: StoresDep, via: TsPullViaQuery = "tickle"
    ) -> m.SettingsOut:
        now = time.time()
        if via == "tickle":  # only a pull the settings tickle caused proves it arrived
            tickle_server.ack(ts.name, wire.Kind.SETTINGS)
        return await run_in_threadpool(st.settings.pull_settings, ts, now, via)

    @app.post(
        "/api/ts/events",
        tags=["task-server"],
        summary="Report status events",
        description="Each event is recorded exactly once by event_id. `accepted` lists the ids "
        "recorded now or before (and ids of unknown executions, ignored); an event for another "
        "task server's client is not accepted.",
    )
    async def report_events(batch: m.EventBatch, ts: TaskServerDep, st: StoresDep) -> m.EventAck:
        outcome = await run_in_threadpool(st.delivery.record_events, ts, batch.events, time.time())
        for event in outcome.recorded:
            metrics.status_events.labels(kind=event.kind).inc()
        for latency, final in zip(outcome.run_now_to_recorded, outcome.finished, strict=True):
            metrics.run_now_to_recorded.observe(latency)
            metrics.executions.labels(status=final).inc()
        return m.EventAck(accepted=outcome.accepted)

    @app.post(
        "/api/ts/computers/state",
        tags=["task-server"],
        summary="Report what the task server sees of its clients",
        description="Tickle reachability and observed address (NAT is detected when it differs "
        "from the address the agent reported).",
    )
    def report_computer_states(
        states: list[m.ComputerState], ts: TaskServerDep, st: StoresDep
    ) -> dict[str, int]:
        st.inventory.update_computer_states(ts, states)
        return {"updated": len(states)}

    return app


def _error_handlers(app: FastAPI) -> None:
    async def not_found(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    async def forbidden(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=403)

    async def conflict(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    app.add_exception_handler(NotFound, not_found)
    app.add_exception_handler(Forbidden, forbidden)
    app.add_exception_handler(Conflict, conflict)
