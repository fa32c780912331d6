"""The requests task servers make for every run and every agent, served without FastAPI's
per-request work.

Every run-now makes the task server pull its work (`GET /api/ts/work`) and forward its agents'
status events (`POST /api/ts/events`, several per run); every agent that registers is one
`POST /api/ts/agents/register` (10,000 of them when a fleet is installed). FastAPI's routing,
dependency solving and response validation cost the NS more than serving them does (issue 10's
S1 profile: the HTTP stack was some 16 of the NS's 28 ms of CPU per run; of a fleet registering,
matching the route and solving its dependencies were more of the NS's CPU than the
registrations' writes), so this ASGI middleware, in front of the routes, answers these three
itself when they are well-formed (see `tickle.fastpath`): the token of a task server this
process looked up lately (no database query; any other token goes to the routes, which check
it), the query parameter the route declares with a valid value, and (for events and
registrations) a JSON body that is a valid `EventBatch` or `AgentRegistration`. It measures the
task server's clock and calls the same services the routes call, with the same arguments; a
refusal of theirs is answered as the app's handler answers it. The OpenAPI description stays
the routes'.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import get_args

import msgspec
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Scope, Send

from tickle import agentapi
from tickle import messages as m
from tickle.fastpath import FastPath, Parts, PassOn, Replay, json_response, model_body
from tickle.ns.auth import measure_clock
from tickle.ns.credentials import Caller, token_sha256
from tickle.ns.errors import STATUS
from tickle.ns.services import Services
from tickle.serving import ARRIVED_AT

WORK = "/api/ts/work"
EVENTS = "/api/ts/events"
REGISTER_AGENT = "/api/ts/agents/register"
_VIAS = frozenset(get_args(m.TsPullVia))

Job = Callable[[Caller, Parts, Replay], Awaitable[str]]


class TaskServerFastPath(FastPath):
    """ASGI middleware: serves well-formed work pulls and event posts; passes on the rest."""

    def __init__(self, app: ASGIApp, *, services: Services) -> None:
        super().__init__(app)
        self._services = services
        self.served = {
            ("GET", WORK): (functools.partial(self._serve, self._work), frozenset({"via"})),
            ("POST", EVENTS): (functools.partial(self._serve, self._events), frozenset()),
            ("POST", REGISTER_AGENT): (
                functools.partial(self._serve, self._register_agent),
                frozenset(),
            ),
        }

    async def _serve(
        self, job: Job, parts: Parts, scope: Scope, receive: Replay, send: Send
    ) -> None:
        """Answer with what `job` answers for the calling task server, or its refusal."""
        ts = self._caller(parts)
        try:
            body = await job(ts, parts, receive)
        except tuple(STATUS) as exc:
            refusal = JSONResponse({"detail": str(exc)}, status_code=STATUS[type(exc)])
            await refusal(scope, receive, send)
            return
        arrived = scope.get("state", {}).get(ARRIVED_AT)
        if isinstance(arrived, float):
            await measure_clock(self._services.clocks, ts, parts.their_time, arrived)
        await json_response(body, scope, receive, send)

    def _caller(self, parts: Parts) -> Caller:
        """The task server whose token the request bears, if this process knows it already."""
        ts = None if parts.token is None else self._services.inventory.cached_caller(
            token_sha256(parts.token)
        )  # fmt: skip
        if ts is None or ts.role != "task_server":
            raise PassOn  # the route checks it (a database query), or refuses it
        return ts

    async def _work(self, ts: Caller, parts: Parts, receive: Replay) -> str:
        via = parts.query.get("via", "tickle")
        if via not in _VIAS:
            raise PassOn
        work = await self._services.delivery.pull_work(ts, via)  # type: ignore[arg-type]
        return work.model_dump_json()

    async def _events(self, ts: Caller, parts: Parts, receive: Replay) -> str:
        # read with the msgspec Structs of the agents' bodies (the same fields and limits as
        # the route's pydantic models, tests/shared/test_agentapi.py): a fraction of pydantic's
        # validation, and of its serialization of each event's row
        if not parts.json_body():
            raise PassOn
        try:
            batch = agentapi.decode(await receive.body(), agentapi.EventBatch)
        except msgspec.MsgspecError:
            raise PassOn from None  # the route answers it (422, as documented)
        if any("\n" in e.computer for e in batch.events):
            # names are matched by pattern, which Python's `re` (msgspec) and pydantic's read
            # apart at a line end: the route judges such a name
            raise PassOn
        ack = await self._services.delivery.record_events(ts, batch.events)
        return ack.model_dump_json()

    async def _register_agent(self, ts: Caller, parts: Parts, receive: Replay) -> str:
        registration = await model_body(m.AgentRegistration, parts, receive)
        credentials = await self._services.inventory.register_agent(ts, registration)
        return credentials.model_dump_json()
