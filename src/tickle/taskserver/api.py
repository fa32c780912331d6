"""The task server's agent-facing HTTP API (FastAPI): registration, the task pull, the policy,
status events; plus health and metrics.

An agent authenticates with the bearer token issued at registration (the task server keeps only
its SHA-256) and can read and report only its own executions. The routes only translate HTTP: the
services they call (on the app's state, one dependency each) hold what the task server does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import Scope

from tickle import clock
from tickle.config import ApiServerSettings
from tickle.messages import (
    AgentEnrollment,
    AgentPolicy,
    AgentRegister,
    AgentTasks,
    EventAck,
    EventBatch,
    Health,
    PolicyVia,
    PullVia,
)
from tickle.metrics import ComponentMetrics
from tickle.serving import BodyLimits, ClockHeaders, JsonRoute, MetricNames, arrived_at
from tickle.taskserver.agent_clocks import AgentClocks
from tickle.taskserver.agent_pulls import AgentPulls
from tickle.taskserver.enrollment import Enrollment
from tickle.taskserver.fast_path import AgentFastPath
from tickle.taskserver.refusal import Refused, refusal_response
from tickle.taskserver.store import Client, Store
from tickle.taskserver.work_cache import WorkCache

T = TypeVar("T")
TAGS = [
    {"name": "health", "description": "Liveness and Prometheus metrics (no credentials)."},
    {"name": "enrollment", "description": "Agent registration (the enrollment secret)."},
    {"name": "pulls", "description": "The agent's pulls: its tasks, its policy. Agent token."},
    {"name": "events", "description": "The agent's status events. Agent token."},
]


REGISTER = "/api/agent/register"
# the agents' long-polls: idle by design, served within bounds of their own (see serving.py)
LONG_POLL = "/api/agent/tasks/wait"


def create_app(
    *,
    limits: ApiServerSettings,
    store: Store,
    metrics: ComponentMetrics,
    enrollment: Enrollment,
    agent_pulls: AgentPulls,
    work_cache: WorkCache,
    agent_clocks: AgentClocks | None = None,
) -> FastAPI:
    """The FastAPI application serving these services."""
    app = FastAPI(
        title="Tickle task server",
        description="Agent-facing API: registration, task pulls, policy, status events.",
        version="1",
        openapi_tags=TAGS,
    )
    app.state.store = store
    app.state.metrics = metrics
    app.state.enrollment = enrollment
    app.state.agent_pulls = agent_pulls
    app.state.work_cache = work_cache
    app.state.agent_clocks = agent_clocks
    app.add_exception_handler(Refused, _refused)
    for router in (operations, enrollment_routes, pull_routes, event_routes):
        app.include_router(router)

    async def known_token(token: str, _scope: Scope) -> bool:
        return store.client_by_token(_token_sha256(token)) is not None

    # innermost: the limits and the clock headers below apply to what it serves too
    app.add_middleware(
        AgentFastPath,
        store=store,
        agent_pulls=agent_pulls,
        work_cache=work_cache,
        agent_clocks=agent_clocks,
        enrollment=enrollment,
    )
    # a registration's body is held to max_registration_body_bytes, and so is any body without
    # an agent's token
    app.add_middleware(
        BodyLimits,
        limits=limits,
        metrics=metrics,
        registrations=[REGISTER],
        known_token=known_token,
    )
    app.add_middleware(ClockHeaders)  # outermost: the arrival before the body limit reads
    return app


# --- dependencies -------------------------------------------------------------------------------


def _state_getter(name: str, kind: type[T]) -> Callable[[Request], Awaitable[T]]:
    """The dependency that returns the service the app keeps on its state as `name` (a `kind`)."""

    # async on purpose: FastAPI runs sync dependencies in a thread pool, and the store's SQLite
    # connection belongs to the event loop's thread
    async def get(request: Request) -> T:
        service: T = getattr(request.app.state, name)
        return service

    return get


get_metrics = _state_getter("metrics", ComponentMetrics)
get_enrollment = _state_getter("enrollment", Enrollment)

MetricsDep = Annotated[ComponentMetrics, Depends(get_metrics)]
EnrollmentDep = Annotated[Enrollment, Depends(get_enrollment)]
_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="AgentToken",
    description="An agent's token, issued by POST /api/agent/register",
)


async def current_agent(
    request: Request,
    auth: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Client:
    """The registered agent whose token is in the Authorization header, else 401.

    The time the agent sent along (`X-Tickle-Time`) is a sample of its clock's offset. The
    agents' routes depend on this alone and take their services from the app's state: each
    dependency costs FastAPI work on every request, and these routes serve every agent.
    """
    if auth is not None:
        store: Store = request.app.state.store
        client = store.client_by_token(_token_sha256(auth.credentials))
        if client is not None:
            _measure_clock(request, client)
            return client
    raise HTTPException(
        status_code=401,
        detail="missing or unknown agent token",
        headers={"WWW-Authenticate": "Bearer"},
    )


AgentDep = Annotated[Client, Depends(current_agent)]
# every agent call says which settings version it has: the NS shows it per computer
SettingsVersionQuery = Annotated[
    int | None,
    Query(ge=0, le=2**31 - 1, description="the settings version the agent has (for the NS)"),
]


# --- routes -------------------------------------------------------------------------------------

operations = APIRouter(tags=["health"], route_class=JsonRoute)


@operations.get("/health", response_model=Health, summary="Liveness")
async def health() -> Health:
    return Health(component="task-server")


@operations.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
async def metrics(exposed: MetricsDep, names: MetricNames = []) -> Response:  # noqa: B006
    body, content_type = exposed.render(names)
    return Response(content=body, media_type=content_type)


enrollment_routes = APIRouter(tags=["enrollment"], route_class=JsonRoute)


@enrollment_routes.post(REGISTER, response_model=AgentEnrollment, summary="Register an agent")
async def register(
    body: AgentRegister, request: Request, enrollment: EnrollmentDep
) -> AgentEnrollment:
    """Enroll an agent: check the secret, register it with the NS, keep its credentials."""
    return await enrollment.enroll(body, _peer(request))


pull_routes = APIRouter(tags=["pulls"], route_class=JsonRoute)


@pull_routes.get("/api/agent/tasks", response_model=AgentTasks, summary="Pull tasks")
async def tasks(
    agent: AgentDep,
    request: Request,
    via: Annotated[
        PullVia,
        Query(
            description="what made the agent pull: tickle (a tasks tickle; only this "
            "acknowledges it), poll (its poll timer, its pull at start or after a failover), "
            "check_now (`tickle agent check-now`). Default poll."
        ),
    ] = "poll",
    settings_version: SettingsVersionQuery = None,
) -> AgentTasks:
    """The agent's pull: its unfinished executions from the cache, and its policy."""
    return await _agent_pulls(request).tasks(agent, via, _peer(request), settings_version)


@pull_routes.get(
    LONG_POLL,
    response_model=AgentTasks,
    summary="Long-poll for tasks",
    responses={
        204: {"description": "nothing arrived within the long-poll timeout: ask again"},
        409: {"description": "long-poll is off for this agent: poll"},
        503: {"description": "the task server holds as many long-polls as it may: poll"},
    },
)
async def wait_for_tasks(
    agent: AgentDep,
    request: Request,
    settings_version: SettingsVersionQuery = None,
) -> AgentTasks | Response:
    """The pull of an agent that cannot be tickled (CEM, or tickle-unreachable), when the NS's
    `long_poll` setting is on: answered as soon as work, a cancel or new settings arrive for
    it (as `GET /api/agent/tasks` answers, via `long_poll`), or 204 after the long-poll timeout
    of its policy. A newer long-poll of the same agent ends this one (204)."""
    answer = await _agent_pulls(request).long_poll(
        agent, _peer(request), settings_version, request.receive
    )
    return Response(status_code=204) if answer is None else answer


@pull_routes.get("/api/agent/policy", response_model=AgentPolicy, summary="Read the policy")
async def policy(
    agent: AgentDep,
    request: Request,
    via: Annotated[
        PolicyVia,
        Query(
            description="what made the agent ask: tickle (a settings tickle; only this "
            "acknowledges it), refresh (`tickle agent policy-refresh`). Default refresh."
        ),
    ] = "refresh",
    settings_version: SettingsVersionQuery = None,
) -> AgentPolicy:
    """The agent's configuration policy; it never carries tasks."""
    return _agent_pulls(request).policy(agent, via, settings_version)


event_routes = APIRouter(tags=["events"], route_class=JsonRoute)


@event_routes.post("/api/agent/events", response_model=EventAck, summary="Report status events")
async def events(
    batch: EventBatch,
    agent: AgentDep,
    request: Request,
    settings_version: SettingsVersionQuery = None,
) -> EventAck:
    """Cache the agent's status events durably, then forward them to the NS.

    An execution this task server does not hold (the agent moved here after running it, or
    the NS no longer lists it) is accepted and left to the NS, which records it only for the
    execution's computer; one cached for another computer is refused.
    """
    _agent_pulls(request).contact(agent, settings_version)
    work_cache: WorkCache = request.app.state.work_cache
    return EventAck(accepted=await work_cache.take_events(agent.name, batch.events))


def _agent_pulls(request: Request) -> AgentPulls:
    pulls: AgentPulls = request.app.state.agent_pulls
    return pulls


def _measure_clock(request: Request, client: Client) -> None:
    clocks: AgentClocks | None = request.app.state.agent_clocks
    if clocks is not None:
        header = request.headers.get(clock.TIME_HEADER)
        clocks.sample_header(client.name, header, arrived_at(request.state), client.cem)


def _token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _peer(request: Request) -> str | None:
    return request.client.host if request.client else None


async def _refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Refused)  # registered for Refused only
    return refusal_response(exc)
