"""The two requests each agent makes for every run, served without FastAPI's per-request work.

A run-now on thousands of agents makes each of them pull (`GET /api/agent/tasks`) and report its
status events (`POST /api/agent/events`) within seconds, all at one task server. FastAPI's
routing, dependency solving and response validation cost several times what serving them does
(issue 10's profile of S5), so this ASGI middleware, in front of the routes, answers these two
itself when they are well-formed: an agent token the store knows, the query parameters the
route declares with plain valid values, and (for events) a JSON body that is a valid
`EventBatch`. It calls the same services the routes call, with the same arguments.

Anything else goes on to the FastAPI routes unchanged (a body already read is handed on), and
they answer it as documented: no token or an unknown one (401), a bad parameter or body (422),
an unusual content type or query. A refusal of the services (`Refused`) is answered as the
app's handler answers it. The OpenAPI description stays the routes'.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import get_args
from urllib.parse import parse_qsl

from pydantic import ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tickle import clock
from tickle.messages import EventAck, EventBatch, PullVia
from tickle.serving import ARRIVED_AT
from tickle.taskserver.agent_clocks import AgentClocks
from tickle.taskserver.agent_pulls import AgentPulls
from tickle.taskserver.refusal import Refused, refusal_response
from tickle.taskserver.store import Client, Store
from tickle.taskserver.work_cache import WorkCache

TASKS = "/api/agent/tasks"
EVENTS = "/api/agent/events"
_VIAS = frozenset(get_args(PullVia))
_VERSION_MAX = 2**31 - 1  # settings_version, as the routes declare it
_TIME_HEADER = clock.TIME_HEADER.lower().encode()


class _PassOn(Exception):
    """Not a request the fast path serves: the routes answer it."""


class _Call:
    """A request the fast path serves: its agent, and its query parameters."""

    __slots__ = ("agent", "content_type", "query")

    def __init__(self, agent: Client, content_type: bytes | None, query: dict[str, str]) -> None:
        self.agent = agent
        self.content_type = content_type
        self.query = query

    def settings_version(self) -> int | None:
        """The `settings_version` parameter (digits, at most 2**31 - 1, as the routes declare);
        anything else is for the route to judge."""
        raw = self.query.get("settings_version")
        if raw is None:
            return None
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 10 or int(raw) > _VERSION_MAX:
            raise _PassOn
        return int(raw)


class _Replay:
    """The request's `receive`, which can read the whole body first and hand it on after."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._body: bytes | None = None
        self._handed = False

    async def body(self) -> bytes:
        parts: list[bytes] = []
        while True:
            message = await self._receive()
            if message["type"] != "http.request":
                break  # the client went away: the route meets it too
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        self._body = b"".join(parts)
        return self._body

    async def __call__(self) -> Message:
        if self._body is None or self._handed:
            return await self._receive()
        self._handed = True
        return {"type": "http.request", "body": self._body, "more_body": False}


Serve = Callable[[_Call, Scope, _Replay, Send], Awaitable[None]]


class AgentFastPath:
    """ASGI middleware: serves well-formed agent pulls and event posts; passes on the rest."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: Store,
        agent_pulls: AgentPulls,
        work_cache: WorkCache,
        agent_clocks: AgentClocks | None,
    ) -> None:
        self.app = app
        self._store = store
        self._pulls = agent_pulls
        self._work_cache = work_cache
        self._clocks = agent_clocks
        self._served: dict[tuple[str, str], tuple[Serve, frozenset[str]]] = {
            ("GET", TASKS): (self._tasks, frozenset({"via", "settings_version"})),
            ("POST", EVENTS): (self._events, frozenset({"settings_version"})),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        served = (
            self._served.get((scope["method"], scope["path"])) if scope["type"] == "http" else None
        )
        if served is not None:
            serve, parameters = served
            replay = _Replay(receive)
            try:
                await serve(self._call(scope, parameters), scope, replay, send)
                return
            except _PassOn:
                receive = replay  # what the fast path read of the body, handed on
        await self.app(scope, receive, send)

    async def _tasks(self, call: _Call, scope: Scope, receive: _Replay, send: Send) -> None:
        via = call.query.get("via", "poll")
        if via not in _VIAS:
            raise _PassOn
        settings_version = call.settings_version()
        answer = await self._pulls.tasks(
            call.agent,
            via,  # type: ignore[arg-type]  # one of PullVia's values: checked above
            _peer(scope),
            settings_version,
        )
        await _json(answer.model_dump_json(), scope, receive, send)

    async def _events(
        self,
        call: _Call,
        scope: Scope,
        receive: _Replay,
        send: Send,
    ) -> None:
        settings_version = call.settings_version()
        if call.content_type not in (None, b"application/json"):
            raise _PassOn
        try:
            batch = EventBatch.model_validate_json(await receive.body())
        except ValidationError:
            raise _PassOn from None  # the route answers it (422, as documented)
        self._pulls.contact(call.agent, settings_version)
        try:
            accepted = await self._work_cache.take_events(call.agent.name, batch.events)
        except Refused as exc:
            await refusal_response(exc)(scope, receive, send)
            return
        await _json(EventAck(accepted=accepted).model_dump_json(), scope, receive, send)

    def _call(self, scope: Scope, parameters: frozenset[str]) -> _Call:
        """The agent and the query of a request the fast path serves; else _PassOn."""
        token: str | None = None
        content_type: bytes | None = None
        their_time: str | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and credentials.strip():
                    token = credentials.strip()
            elif name == b"content-type":
                content_type = value
            elif name == _TIME_HEADER:
                their_time = value.decode("latin-1")
        query: dict[str, str] = {}
        if scope["query_string"]:
            try:
                pairs = parse_qsl(
                    scope["query_string"].decode("ascii"),
                    keep_blank_values=True,
                    strict_parsing=True,
                )
            except (UnicodeDecodeError, ValueError):
                raise _PassOn from None
            query = dict(pairs)
            if len(query) != len(pairs) or not query.keys() <= parameters:
                raise _PassOn  # repeated or unknown parameters: the route decides
        agent = None if token is None else self._store.client_by_token(_sha256(token))
        if agent is None:
            raise _PassOn  # 401 from the route
        self._measure_clock(agent, scope, their_time)
        return _Call(agent, content_type, query)

    def _measure_clock(self, agent: Client, scope: Scope, their_time: str | None) -> None:
        """The time the agent sent along is a sample of its clock's offset (as on the routes)."""
        arrived = scope.get("state", {}).get(ARRIVED_AT)
        if self._clocks is not None and isinstance(arrived, float):
            self._clocks.sample_header(agent.name, their_time, arrived, agent.cem)


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def _json(body: str, scope: Scope, receive: Receive, send: Send) -> None:
    await Response(body, media_type="application/json")(scope, receive, send)


def _peer(scope: Scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else None
