"""A small fake task server: the agent-facing routes of ARCHITECTURE.md, recording every call.

The real task server is written concurrently; this fake lets the agent's tests pin down exactly
which calls a tickle, a poll or a control command causes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Handler

from tickle import clock
from tickle.messages import (
    AgentEnrollment,
    AgentPolicy,
    AgentRegister,
    AgentTasks,
    EventAck,
    EventBatch,
    ExecutionWork,
    StatusEvent,
)


@dataclass
class Call:
    route: str  # health | register | tasks | wait | policy | events
    at: float
    peer: str | None
    via: str | None = None
    answered_at: float | None = None
    settings_version: str | None = None  # as the agent reported it (query parameter)
    refused: bool = False  # answered an error at once (the long-poll while `long_poll_status`)


@dataclass
class FakeTaskServer:
    """Serves chosen executions until a `finished` event for them arrives."""

    name: str = "ts1"
    policy: AgentPolicy = field(
        default_factory=lambda: AgentPolicy(
            settings_version=1, task_request_interval_s=1800, poll_jitter_fraction=0.1, cem=False
        )
    )
    secret: str = "enroll-me"
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    calls: list[Call] = field(default_factory=list)
    registrations: list[AgentRegister] = field(default_factory=list)
    events: list[StatusEvent] = field(default_factory=list)
    work: dict[int, ExecutionWork] = field(default_factory=dict)
    cancel: list[int] = field(default_factory=list)  # the cancels every pull lists
    keep_serving: bool = False  # serve executions even after they finished
    events_down: bool = False  # answer 503 to events (the task server "is down" for them)
    down_batches: list[int] = field(default_factory=list)  # the events of each batch answered 503
    refuse_executions: set[int] = field(default_factory=set)  # batches with these: 403
    max_batch_events: int | None = None  # larger batches: 413, as over max_body_bytes
    pull_gate: Callable[[], asyncio.Future[None] | None] | None = None
    events_gate: asyncio.Event | None = None  # when given: event posts wait until it is set
    tokens: set[str] = field(default_factory=set)
    # each agent's first `register_refusals` registrations: answered 503 ("restarting"), with
    # this Retry-After if any; `register_tries` has the time of every registration, by name
    register_refusals: int = 0
    register_retry_after: str | None = None
    register_tries: dict[str, list[float]] = field(default_factory=dict)
    # the long-poll: answered with this status when it is an error; else it waits until
    # `long_poll_release` is set (or `long_poll_hold_s` passes), then answers the work, or 204
    long_poll_status: int = 200
    long_poll_retry_after: str | None = None  # the refusal's Retry-After, if any
    long_poll_release: asyncio.Event = field(default_factory=asyncio.Event)
    long_poll_hold_s: float = 0.0
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        app = web.Application(middlewares=[_with_our_time])
        app.router.add_get("/health", self._health)
        app.router.add_post("/api/agent/register", self._register)
        app.router.add_get("/api/agent/tasks", self._tasks)
        app.router.add_get("/api/agent/tasks/wait", self._wait)
        app.router.add_get("/api/agent/policy", self._policy)
        app.router.add_post("/api/agent/events", self._events)
        # a long-poll armed after a test's last release would hold its handler, and the
        # cleanup with it, for aiohttp's default 60 s (one CI run's teardown took that long)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        assert server is not None
        sock = server.sockets[0]  # type: ignore[attr-defined]
        self.url = f"http://{host}:{sock.getsockname()[1]}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # --- what tests look at ------------------------------------------------------------------

    def routes(self, since: float = 0.0) -> list[str]:
        return [c.route for c in self.calls if c.at >= since]

    def pulls(self, via: str | None = None, since: float = 0.0) -> list[Call]:
        return [
            c for c in self.calls
            if c.route == "tasks" and c.at >= since and (via is None or c.via == via)
        ]  # fmt: skip

    def events_of(self, execution_id: int, kind: str | None = None) -> list[StatusEvent]:
        return [
            e for e in self.events
            if e.execution_id == execution_id and (kind is None or e.kind == kind)
        ]  # fmt: skip

    def revoke_tokens(self) -> None:
        self.tokens.clear()

    # --- routes --------------------------------------------------------------------------------

    def _record(self, request: web.Request, route: str) -> Call:
        call = Call(
            route=route, at=time.time(), peer=request.remote, via=request.query.get("via"),
            settings_version=request.query.get("settings_version"),
        )  # fmt: skip
        self.calls.append(call)
        return call

    def _authorize(self, request: web.Request) -> None:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token not in self.tokens:
            raise web.HTTPUnauthorized(text='{"detail":"bad token"}')

    async def _health(self, request: web.Request) -> web.Response:
        self._record(request, "health")
        return web.json_response({"status": "ok", "component": "task-server"})

    async def _register(self, request: web.Request) -> web.Response:
        self._record(request, "register")
        body = AgentRegister.model_validate_json(await request.read())
        if body.enrollment_secret != self.secret:
            raise web.HTTPUnauthorized(text='{"detail":"bad enrollment secret"}')
        tries = self.register_tries.setdefault(body.name, [])
        tries.append(time.time())
        if len(tries) <= self.register_refusals:
            retry = (
                {}
                if self.register_retry_after is None
                else {"Retry-After": self.register_retry_after}
            )
            return web.json_response({"detail": "restarting"}, status=503, headers=retry)
        self.registrations.append(body)
        token = secrets.token_urlsafe(32)
        self.tokens.add(token)
        enrollment = AgentEnrollment(
            name=body.name, token=token, tickle_key=base64.b64encode(self.key).decode(),
            ts_name=self.name, policy=self.policy,
        )  # fmt: skip
        return web.json_response(text=enrollment.model_dump_json())

    async def _tasks(self, request: web.Request) -> web.Response:
        call = self._record(request, "tasks")
        self._authorize(request)
        if self.pull_gate is not None:
            gate = self.pull_gate()
            if gate is not None:
                await gate
        answer = AgentTasks(
            executions=list(self.work.values()), policy=self.policy, cancel=self.cancel
        )
        call.answered_at = time.time()
        return web.json_response(text=answer.model_dump_json())

    async def _wait(self, request: web.Request) -> web.Response:
        call = self._record(request, "wait")
        self._authorize(request)
        if self.long_poll_status >= 400:
            retry = (
                {}
                if self.long_poll_retry_after is None
                else {"Retry-After": self.long_poll_retry_after}
            )
            call.refused = True
            call.answered_at = time.time()
            return web.json_response(
                {"detail": "refused"}, status=self.long_poll_status, headers=retry
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.long_poll_release.wait(), self.long_poll_hold_s)
        self.long_poll_release.clear()
        call.answered_at = time.time()
        if self.long_poll_status >= 400:  # went down while it waited: every waiting one fails
            return web.json_response({"detail": "restarting"}, status=self.long_poll_status)
        if not self.work:
            return web.Response(status=204)
        answer = AgentTasks(
            executions=list(self.work.values()), policy=self.policy, cancel=self.cancel
        )
        return web.json_response(text=answer.model_dump_json())

    async def _policy(self, request: web.Request) -> web.Response:
        self._record(request, "policy")
        self._authorize(request)
        return web.json_response(text=self.policy.model_dump_json())

    async def _events(self, request: web.Request) -> web.Response:
        self._record(request, "events")
        self._authorize(request)
        batch = EventBatch.model_validate_json(await request.read())
        if self.events_gate is not None:
            await self.events_gate.wait()
        if self.events_down:
            self.down_batches.append(len(batch.events))
            raise web.HTTPServiceUnavailable(text='{"detail":"down"}')
        if any(e.execution_id in self.refuse_executions for e in batch.events):
            raise web.HTTPForbidden(text='{"detail":"not your execution"}')
        if self.max_batch_events is not None and len(batch.events) > self.max_batch_events:
            raise web.HTTPRequestEntityTooLarge(
                max_size=self.max_batch_events, actual_size=len(batch.events)
            )
        known = {e.event_id for e in self.events}
        for event in batch.events:
            if event.event_id not in known:
                self.events.append(event)
                known.add(event.event_id)
            if event.kind == "finished" and not self.keep_serving:
                self.work.pop(event.execution_id, None)
        ack = EventAck(accepted=[e.event_id for e in batch.events])
        return web.json_response(text=ack.model_dump_json())


@web.middleware
async def _with_our_time(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer carries the (fake) task server's time, as the real one's do."""
    response = await handler(request)
    response.headers[clock.TIME_HEADER] = clock.header_value(time.time())
    return response
