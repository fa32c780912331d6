"""The requests each agent makes for every run, and once to register, served without FastAPI's
per-request work.

A run-now on thousands of agents makes each of them pull (`GET /api/agent/tasks`) and report its
status events (`POST /api/agent/events`) within seconds, all at one task server; a fleet being
installed registers thousands at once (`POST /api/agent/register`). FastAPI's routing, dependency
solving and response validation cost several times what serving them does (issue 10's profile of S5;
of a fleet registering, a third of the task server's CPU), so this ASGI middleware, in front of the
routes, answers these three itself when they are well-formed: an agent token the store knows (a
registration: none; its enrollment secret is checked as the route has it checked), the query
parameters the route declares with plain valid values, and (for events and registrations) a JSON
body that is a valid `EventBatch` or `AgentRegister`. It calls the same services the routes call,
with the same arguments. A pull is answered at once, from memory, with nothing awaited: at the
connection it is answered as soon as it is read, without a task of its own (`FastPath.served_now`;
S5 ~5 % more pulls/s, alternated). It reads an event batch with the msgspec Structs of the agent's
bodies (`tickle.agentapi`: the same fields and limits as the routes' pydantic models,
tests/shared/test_agentapi.py), which cost a fraction of pydantic's validation; a batch they refuse,
or whose events are not all the agent's own computer's, goes to the route, which judges it with
pydantic. A registration is read with the route's pydantic model (what enrollment takes); one it
refuses goes to the route.

Anything else goes on to the FastAPI routes unchanged (a body already read is handed on), and
they answer it as documented: no token or an unknown one (401), a bad parameter or body (422),
an unusual content type or query. A refusal of the services (`Refused`) is answered as the
app's handler answers it. The OpenAPI description stays the routes'.
"""

from __future__ import annotations

import hashlib
from typing import get_args

import msgspec
from starlette.types import ASGIApp, Scope, Send

from tickle import agentapi
from tickle.fastpath import (
    FastPath,
    Parts,
    PassOn,
    Replay,
    at_once,
    json_response,
    model_body,
)
from tickle.messages import AgentRegister, PullVia
from tickle.serving import ARRIVED_AT
from tickle.taskserver.agent_clocks import AgentClocks
from tickle.taskserver.agent_pulls import AgentPulls
from tickle.taskserver.enrollment import Enrollment
from tickle.taskserver.refusal import Refused, refusal_response
from tickle.taskserver.store import Client, Store
from tickle.taskserver.work_cache import WorkCache

TASKS = "/api/agent/tasks"
EVENTS = "/api/agent/events"
REGISTER = "/api/agent/register"
_VIAS = frozenset(get_args(PullVia))
_VERSION_MAX = 2**31 - 1  # settings_version, as the routes declare it


class _Call:
    """A request the fast path serves: its agent, and its head."""

    __slots__ = ("agent", "parts")

    def __init__(self, agent: Client, parts: Parts) -> None:
        self.agent = agent
        self.parts = parts

    def settings_version(self) -> int | None:
        """The `settings_version` parameter (digits, at most 2**31 - 1, as the routes declare);
        anything else is for the route to judge."""
        raw = self.parts.query.get("settings_version")
        if raw is None:
            return None
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 10 or int(raw) > _VERSION_MAX:
            raise PassOn
        return int(raw)


class AgentFastPath(FastPath):
    """ASGI middleware: serves well-formed agent pulls, event posts and registrations; passes on
    the rest."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: Store,
        agent_pulls: AgentPulls,
        work_cache: WorkCache,
        agent_clocks: AgentClocks | None,
        enrollment: Enrollment | None = None,
    ) -> None:
        super().__init__(app)
        self._store = store
        self._enrollment = enrollment
        self._pulls = agent_pulls
        self._work_cache = work_cache
        self._clocks = agent_clocks
        pull_parameters = frozenset({"via", "settings_version"})
        self.served_now = {("GET", TASKS): (self._tasks, pull_parameters)}
        self.served = {
            ("GET", TASKS): (at_once(self._tasks), pull_parameters),
            ("POST", EVENTS): (self._events, frozenset({"settings_version"})),
            ("POST", REGISTER): (self._register, frozenset()),
        }

    def _tasks(self, parts: Parts, scope: Scope) -> bytes:
        call = self._call(parts, scope)
        via = call.parts.query.get("via", "poll")
        if via not in _VIAS:
            raise PassOn
        return self._pulls.tasks_json(
            call.agent,
            via,  # type: ignore[arg-type]  # one of PullVia's values: checked above
            _peer(scope),
            call.settings_version(),
        )

    async def _events(self, parts: Parts, scope: Scope, receive: Replay, send: Send) -> None:
        call = self._call(parts, scope)
        settings_version = call.settings_version()
        if not call.parts.json_body():
            raise PassOn
        try:
            batch = agentapi.decode(await receive.body(), agentapi.EventBatch)
        except msgspec.MsgspecError:
            raise PassOn from None  # the route answers it (422, as documented)
        if any(e.computer != call.agent.name for e in batch.events):
            # names are matched by pattern, which Python's `re` (msgspec) and pydantic's read
            # apart at a line end: the route judges an event of another name (403 or 422)
            raise PassOn
        self._pulls.contact(call.agent, settings_version)
        try:
            accepted = await self._work_cache.take_events(call.agent.name, batch.events)
        except Refused as exc:
            await refusal_response(exc)(scope, receive, send)
            return
        ack = agentapi.EventAck(accepted=accepted)
        await json_response(agentapi.encode(ack), scope, receive, send)

    async def _register(self, parts: Parts, scope: Scope, receive: Replay, send: Send) -> None:
        # no token: the enrollment secret in the body is checked by `Enrollment.enroll`, as for
        # the route; the body is the route's pydantic model (what `enroll` takes)
        if self._enrollment is None:
            raise PassOn
        body = await model_body(AgentRegister, parts, receive)
        try:
            enrolled = await self._enrollment.enroll(body, _peer(scope))
        except Refused as exc:
            await refusal_response(exc)(scope, receive, send)
            return
        await json_response(enrolled.model_dump_json(), scope, receive, send)

    def _call(self, parts: Parts, scope: Scope) -> _Call:
        """The agent and the head of a request the fast path serves; else PassOn."""
        agent = None if parts.token is None else self._store.client_by_token(_sha256(parts.token))
        if agent is None:
            raise PassOn  # 401 from the route
        self._measure_clock(agent, scope, parts.their_time)
        return _Call(agent, parts)

    def _measure_clock(self, agent: Client, scope: Scope, their_time: str | None) -> None:
        """The time the agent sent along is a sample of its clock's offset (as on the routes)."""
        arrived = scope.get("state", {}).get(ARRIVED_AT)
        if self._clocks is not None and isinstance(arrived, float):
            self._clocks.sample_header(agent.name, their_time, arrived, agent.cem)


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _peer(scope: Scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else None
