"""The task server's agent-facing HTTP API (FastAPI): registration, the task pull, the policy,
status events; plus health and metrics.

An agent authenticates with the bearer token issued at registration (the task server keeps only
its SHA-256) and can read and report only its own executions.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

import aiohttp
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tickle import wire
from tickle.http import ApiError
from tickle.messages import (
    AgentEnrollment,
    AgentPolicy,
    AgentRegister,
    AgentRegistration,
    AgentTasks,
    ComputerState,
    EventAck,
    EventBatch,
    Health,
    PolicyVia,
    PullVia,
    StatusEvent,
)
from tickle.metrics import ComponentMetrics
from tickle.outbox import Outbox
from tickle.taskserver.agent_tickler import AgentTickler
from tickle.taskserver.ns_client import NsClient
from tickle.taskserver.settings import TaskServerSettings
from tickle.taskserver.state_reporter import StateReporter
from tickle.taskserver.store import Client, Store

log = logging.getLogger(__name__)

AGENT_EVENT_KINDS = frozenset({"started", "step_finished", "finished"})
# Until the NS hands down its settings: the spec's defaults.
DEFAULT_INTERVAL_S = 1800
DEFAULT_JITTER = 0.1


@dataclass
class ApiContext:
    """What the routes use; built once by the service, replaced by tests."""

    settings: TaskServerSettings
    store: Store
    outbox: Outbox
    wake_forwarder: Callable[[], None]
    ns: NsClient
    agents: AgentTickler
    reporter: StateReporter
    metrics: ComponentMetrics
    # a work pull from the NS: after a registration, for work of a computer that moved here
    pull_work: Callable[[], Awaitable[None]] | None = None


def create_app(ctx: ApiContext) -> FastAPI:
    """The FastAPI application serving `ctx`."""
    app = FastAPI(
        title="Tickle task server",
        description="Agent-facing API: registration, task pulls, policy, status events.",
        version="1",
    )
    app.state.ctx = ctx
    app.include_router(_router())
    return app


async def get_ctx(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


CtxDep = Annotated[ApiContext, Depends(get_ctx)]
_bearer = HTTPBearer(auto_error=False)


async def current_agent(
    ctx: CtxDep,
    auth: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Client:
    """The registered agent whose token is in the Authorization header, else 401.

    Async on purpose: FastAPI runs sync dependencies in a thread pool, and the store's SQLite
    connection belongs to the event loop's thread.
    """
    if auth is not None:
        client = ctx.store.client_by_token(hashlib.sha256(auth.credentials.encode()).hexdigest())
        if client is not None:
            return client
    raise HTTPException(
        status_code=401,
        detail="missing or unknown agent token",
        headers={"WWW-Authenticate": "Bearer"},
    )


AgentDep = Annotated[Client, Depends(current_agent)]


def policy_for(store: Store, cem: bool) -> AgentPolicy:
    """The agent's configuration policy from the NS settings (never tasks)."""
    settings = store.settings()
    if settings is None:
        return AgentPolicy(
            settings_version=0,
            task_request_interval_s=DEFAULT_INTERVAL_S,
            poll_jitter_fraction=DEFAULT_JITTER,
            cem=cem,
        )
    return AgentPolicy(
        settings_version=settings.version,
        task_request_interval_s=settings.task_request_interval_s,
        poll_jitter_fraction=settings.poll_jitter_fraction,
        cem=cem,
    )


def _router() -> APIRouter:
    router = APIRouter()

    @router.get("/health", response_model=Health)
    async def health() -> Health:
        return Health(component="task-server")

    @router.get("/metrics")
    async def metrics(ctx: CtxDep) -> Response:
        body, content_type = ctx.metrics.render()
        return Response(content=body, media_type=content_type)

    @router.post("/api/agent/register", response_model=AgentEnrollment)
    async def register(body: AgentRegister, request: Request, ctx: CtxDep) -> AgentEnrollment:
        """Enroll an agent: check the secret, register it with the NS, keep its credentials."""
        expected = ctx.settings.enrollment_secret.get_secret_value()
        if not hmac.compare_digest(body.enrollment_secret.encode(), expected.encode()):
            raise HTTPException(status_code=401, detail="wrong enrollment secret")
        observed = _peer(request)
        registration = AgentRegistration(
            name=body.name,
            tickle_host=body.tickle_host,
            tickle_port=body.tickle_port,
            cem=body.cem,
            reported_address=body.reported_address,
            observed_address=observed,
            groups=body.groups,
        )
        try:
            creds = await ctx.ns.register_agent(registration)
        except ApiError as exc:
            status = exc.status if exc.status in (403, 404, 409, 422) else 502
            raise HTTPException(status_code=status, detail=f"NS: {exc.detail}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise HTTPException(status_code=503, detail=f"NS unreachable: {exc}") from None
        ctx.store.save_client(
            Client(
                name=creds.name,
                token_sha256=hashlib.sha256(creds.token.encode()).hexdigest(),
                tickle_key=creds.tickle_key,
                tickle_host=body.tickle_host,
                tickle_port=body.tickle_port,
                cem=body.cem,
                reported_address=body.reported_address,
                observed_address=observed,
            )
        )
        log.info("agent %s registered (cem=%s, seen from %s)", creds.name, body.cem, observed)
        if ctx.pull_work is not None:
            # a computer failing over brings its unfinished work: have it here before answering
            await ctx.pull_work()
        return AgentEnrollment(
            name=creds.name,
            token=creds.token,
            tickle_key=creds.tickle_key,
            ts_name=ctx.settings.name,
            policy=policy_for(ctx.store, body.cem),
        )

    @router.get("/api/agent/tasks", response_model=AgentTasks)
    async def tasks(
        agent: AgentDep,
        request: Request,
        ctx: CtxDep,
        via: Annotated[PullVia, Query(description="what made the agent pull")] = "poll",
    ) -> AgentTasks:
        """The agent's pull: its unfinished executions from the cache, and its policy."""
        if via == "tickle":
            # only a pull the tickle caused proves the agent tickle-reachable; a poll does not
            # (its tickle may have been dropped). Ack before reading: work cached after this
            # point gets a tickle of its own.
            ctx.agents.ack(agent.name, wire.Kind.TASKS)
        ctx.metrics.pulls.labels(via=via).inc()
        if via == "poll":
            ctx.metrics.polls.inc()
        _note_address(ctx, agent, _peer(request))
        pending = ctx.store.pending_work(agent.name)
        first = [w for w in pending if not w.agent_pulled]
        if first:
            now = time.time()
            events = [
                StatusEvent(
                    event_id=str(uuid.uuid4()),
                    execution_id=w.execution_id,
                    computer=agent.name,
                    kind="agent_pulled",
                    at=now,
                    cached_at=now,
                    via=via,
                )
                for w in first
            ]
            ctx.outbox.put_many((e.event_id, e.model_dump_json()) for e in events)
            ctx.store.mark("agent_pulled", (w.execution_id for w in first))
            ctx.metrics.status_events.labels(kind="agent_pulled").inc(len(events))
            ctx.wake_forwarder()
        return AgentTasks(
            executions=[w.work for w in pending], policy=policy_for(ctx.store, agent.cem)
        )

    @router.get("/api/agent/policy", response_model=AgentPolicy)
    async def policy(
        agent: AgentDep,
        ctx: CtxDep,
        via: Annotated[PolicyVia, Query(description="what made the agent ask")] = "refresh",
    ) -> AgentPolicy:
        """The agent's configuration policy; it never carries tasks."""
        if via == "tickle":  # only a fetch the settings tickle caused proves it arrived
            ctx.agents.ack(agent.name, wire.Kind.SETTINGS)
        return policy_for(ctx.store, agent.cem)

    @router.post("/api/agent/events", response_model=EventAck)
    async def events(batch: EventBatch, agent: AgentDep, ctx: CtxDep) -> EventAck:
        """Cache the agent's status events durably, then forward them to the NS.

        An execution this task server does not hold (the agent moved here after running it, or
        the NS no longer lists it) is accepted and left to the NS, which records it only for the
        execution's computer; one cached for another computer is refused.
        """
        for event in batch.events:
            if event.computer != agent.name:
                log.warning("agent %s sent event %s for computer %s: refused",
                            agent.name, event.event_id, event.computer)  # fmt: skip
                raise HTTPException(
                    status_code=403,
                    detail=f"event {event.event_id} is for computer {event.computer!r},"
                    f" not {agent.name!r}",
                )
            owner = ctx.store.work_owner(event.execution_id)
            if owner is not None and owner != agent.name:
                log.warning("agent %s sent event %s for %s's execution %d: refused",
                            agent.name, event.event_id, owner, event.execution_id)  # fmt: skip
                raise HTTPException(
                    status_code=403,
                    detail=f"execution {event.execution_id} is not one of {agent.name!r}'s",
                )
            if event.kind not in AGENT_EVENT_KINDS:
                raise HTTPException(
                    status_code=422,
                    detail=f"event {event.event_id}: kind {event.kind!r} is reported by the"
                    " task server, not by agents",
                )
        now = time.time()
        cached = [e.model_copy(update={"cached_at": now}) for e in batch.events]
        # durable before the answer: the agent drops its copy once we acknowledge
        ctx.outbox.put_many((e.event_id, e.model_dump_json()) for e in cached)
        ctx.wake_forwarder()
        finished = [e.execution_id for e in cached if e.kind == "finished"]
        if finished:
            ctx.store.mark("done", finished)
        for e in cached:
            ctx.metrics.status_events.labels(kind=e.kind).inc()
            if e.kind == "finished" and e.status is not None:
                ctx.metrics.executions.labels(status=e.status).inc()
        return EventAck(accepted=[e.event_id for e in cached])

    return router


def _peer(request: Request) -> str | None:
    return request.client.host if request.client else None


def _note_address(ctx: ApiContext, agent: Client, peer: str | None) -> None:
    """Tell the NS when the agent is seen from a new address (NAT shows as a difference)."""
    if peer is None or peer == agent.observed_address:
        return
    ctx.store.set_observed_address(agent.name, peer)
    ctx.reporter.report(ComputerState(name=agent.name, observed_address=peer, at=time.time()))
