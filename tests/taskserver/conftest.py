"""Fixtures for the task server: a small fake NS, a fake agent's tickle socket, a running TS."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from tickle import clock, wire
from tickle.config import load_settings
from tickle.http import request
from tickle.messages import (
    AgentCredentials,
    AgentEnrollment,
    AgentRegister,
    AgentRegistration,
    ClientInfo,
    ComputerState,
    EventAck,
    EventBatch,
    ExecutionWork,
    SettingsOut,
    StatusEvent,
    TaskServerCredentials,
    TaskServerRegister,
    TaskSpec,
    WorkOut,
)
from tickle.taskserver.service import TaskServer
from tickle.taskserver.settings import TaskServerSettings

SECRET = "enroll-me-0123456789"  # the task servers' enrollment secret
AGENT_SECRET = "agent-enroll-me-0123456789"  # the agents'


async def wait_until(check: Callable[[], Any], within_s: float = 5.0, what: str = "") -> Any:
    """Poll `check` until it returns something truthy; fail after `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what or check}")
        await asyncio.sleep(0.01)


def work_for(execution_id: int, computer: str) -> ExecutionWork:
    return ExecutionWork(
        execution_id=execution_id,
        computer=computer,
        kind="task",
        steps=[TaskSpec(name="hello", command=["echo", "hi"])],
    )


@dataclass
class FakeNs:
    """Just the NS routes a task server calls, recording every call."""

    ns_id: str = "ns-test"
    tickle_key: bytes = field(default_factory=lambda: os.urandom(32))
    ts_token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    settings: SettingsOut = field(
        default_factory=lambda: SettingsOut(
            version=1, task_request_interval_s=1800, poll_jitter_fraction=0.1,
            ts_check_interval_s=60,
        )
    )  # fmt: skip
    work: list[ExecutionWork] = field(default_factory=list)
    cancel: list[int] = field(default_factory=list)  # the cancels a work pull lists
    clients: dict[str, ClientInfo] = field(default_factory=dict)
    events: dict[str, StatusEvent] = field(default_factory=dict)
    states: list[ComputerState] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    # (call, the `via` query parameter) of every work and settings pull
    pulls: list[tuple[str, str | None]] = field(default_factory=list)
    registrations: list[TaskServerRegister] = field(default_factory=list)
    # answers (status, detail) to the next task server registrations, before one is accepted
    refusals: list[tuple[int, str]] = field(default_factory=list)
    refused: list[TaskServerRegister] = field(default_factory=list)
    refusal_retry_after_s: int | None = None  # a Retry-After on those refusals
    states_busy: int = 0  # the next state reports answered 429 with `refusal_retry_after_s`
    states_delay_s: float = 0.0  # each state report takes this long to answer
    work_down: int = 0  # the next work pulls answered 503 with `refusal_retry_after_s`
    agent_registrations: list[AgentRegistration] = field(default_factory=list)
    work_delay_s: float = 0.0
    refuse_executions: set[int] = field(default_factory=set)  # events answered with 403
    # agents' registrations answered with this status and detail, as the NS refuses them
    refuse_registration: tuple[int, str] | None = None
    forgotten: set[str] = field(default_factory=set)  # computers the operator forgot
    max_batch_events: int | None = None  # larger batches: 413, as over max_body_bytes
    # events left out of `accepted`, as the NS does for another task server's client
    omit_executions: set[int] = field(default_factory=set)
    work_gate: asyncio.Event | None = None  # when set: work pulls wait until it opens
    settings_gate: asyncio.Event | None = None  # when set: settings pulls wait until it opens
    events_gate: asyncio.Event | None = None  # when set: event posts wait until it opens
    clock_offset_s: float = 0.0  # how far its clock (the time on its answers) is ahead of ours
    port: int = 0
    _runner: web.AppRunner | None = None
    _seq: wire.SequenceCounter = field(default_factory=wire.SequenceCounter)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, call: str) -> int:
        return self.calls.count(call)

    def vias(self, call: str) -> list[str | None]:
        """Why each `work` or `settings` pull was made, in order (its `via`)."""
        return [via for c, via in self.pulls if c == call]

    def tickle(self, kind: wire.Kind = wire.Kind.TASKS, **kw: Any) -> bytes:
        """A valid NS tickle datagram (keyword arguments override its parts)."""
        return wire.encode(
            kind,
            kw.get("sender", self.ns_id),
            kw.get("seq", self._seq.next()),
            kw.get("key", self.tickle_key),
            kw.get("sent_at_ms"),
        )

    async def start(self) -> None:
        app = web.Application(middlewares=[self._with_its_time])
        app.router.add_post("/api/ts/register", self._register)
        app.router.add_post("/api/ts/agents/register", self._register_agent)
        app.router.add_get("/api/ts/clients", self._clients)
        app.router.add_get("/api/ts/work", self._work)
        app.router.add_get("/api/ts/settings", self._settings)
        app.router.add_post("/api/ts/events", self._events)
        app.router.add_post("/api/ts/computers/state", self._states)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    @web.middleware
    async def _with_its_time(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every answer carries the NS's time, as the real one's do."""
        response = await handler(request)
        its_time = time.time() + self.clock_offset_s
        response.headers[clock.TIME_HEADER] = clock.header_value(its_time)
        return response

    async def stop(self) -> None:
        for gate in (self.work_gate, self.settings_gate, self.events_gate):
            if gate is not None:
                gate.set()  # release held requests so the server can shut down
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _authorized(self, req: web.Request) -> None:
        if req.headers.get("Authorization") != f"Bearer {self.ts_token}":
            raise web.HTTPUnauthorized(text='{"detail": "bad task server token"}')

    async def _register(self, req: web.Request) -> web.Response:
        body = TaskServerRegister.model_validate_json(await req.read())
        self.calls.append("register")
        if body.enrollment_secret != SECRET:
            raise web.HTTPUnauthorized(text='{"detail": "wrong enrollment secret"}')
        if self.refusals:
            self.refused.append(body)
            status, detail = self.refusals.pop(0)
            retry = self.refusal_retry_after_s
            headers = {} if retry is None else {"Retry-After": str(retry)}
            return web.json_response({"detail": detail}, status=status, headers=headers)
        self.registrations.append(body)
        creds = TaskServerCredentials(
            name=body.name,
            token=self.ts_token,
            tickle_key=base64.b64encode(self.tickle_key).decode(),
            ns_id=self.ns_id,
        )
        return web.json_response(text=creds.model_dump_json())

    async def _register_agent(self, req: web.Request) -> web.Response:
        self._authorized(req)
        body = AgentRegistration.model_validate_json(await req.read())
        self.calls.append("register_agent")
        if self.refuse_registration is not None:
            status, detail = self.refuse_registration
            return web.json_response({"detail": detail}, status=status)
        self.agent_registrations.append(body)
        token = secrets.token_urlsafe(16)
        key = base64.b64encode(os.urandom(32)).decode()
        self.clients[body.name] = ClientInfo(
            name=body.name,
            token_sha256=hashlib.sha256(token.encode()).hexdigest(),
            tickle_key=key,
            tickle_host=body.tickle_host,
            tickle_port=body.tickle_port,
            cem=body.cem,
        )
        creds = AgentCredentials(name=body.name, token=token, tickle_key=key)
        return web.json_response(text=creds.model_dump_json())

    async def _clients(self, req: web.Request) -> web.Response:
        self._authorized(req)
        self.calls.append("clients")
        return web.json_response([c.model_dump() for c in self.clients.values()])

    async def _work(self, req: web.Request) -> web.Response:
        self._authorized(req)
        self.calls.append("work")
        self.pulls.append(("work", req.query.get("via")))
        if self.work_down:
            self.work_down -= 1
            retry = self.refusal_retry_after_s
            headers = {} if retry is None else {"Retry-After": str(retry)}
            return web.json_response({"detail": "restarting"}, status=503, headers=headers)
        if self.work_delay_s:
            await asyncio.sleep(self.work_delay_s)
        if self.work_gate is not None:
            await self.work_gate.wait()
        work = WorkOut(executions=self.work, cancel=self.cancel)
        return web.json_response(text=work.model_dump_json())

    async def _settings(self, req: web.Request) -> web.Response:
        self._authorized(req)
        self.calls.append("settings")
        self.pulls.append(("settings", req.query.get("via")))
        if self.settings_gate is not None:
            await self.settings_gate.wait()
        return web.json_response(text=self.settings.model_dump_json())

    async def _events(self, req: web.Request) -> web.Response:
        self._authorized(req)
        batch = EventBatch.model_validate_json(await req.read())
        self.calls.append("events")
        if self.events_gate is not None:
            await self.events_gate.wait()
        if any(e.execution_id in self.refuse_executions for e in batch.events):
            raise web.HTTPForbidden(text='{"detail": "not your execution"}')
        if self.max_batch_events is not None and len(batch.events) > self.max_batch_events:
            raise web.HTTPRequestEntityTooLarge(
                max_size=self.max_batch_events, actual_size=len(batch.events)
            )
        kept = [e for e in batch.events if e.execution_id not in self.omit_executions]
        for e in kept:
            self.events.setdefault(e.event_id, e)
        ack = EventAck(accepted=[e.event_id for e in kept])
        return web.json_response(text=ack.model_dump_json())

    async def _states(self, req: web.Request) -> web.Response:
        self._authorized(req)
        self.calls.append("states")
        if self.states_busy:
            self.states_busy -= 1
            retry = self.refusal_retry_after_s
            headers = {} if retry is None else {"Retry-After": str(retry)}
            return web.json_response({"detail": "busy"}, status=429, headers=headers)
        states = [ComputerState.model_validate(s) for s in await req.json()]
        if self.states_delay_s:
            await asyncio.sleep(self.states_delay_s)
        self.states.extend(states)
        forgotten = sorted({s.name for s in states} & self.forgotten)
        return web.json_response({"updated": len(states) - len(forgotten), "forgotten": forgotten})

    def events_of(self, kind: str) -> list[StatusEvent]:
        return [e for e in self.events.values() if e.kind == kind]


class FakeAgentSocket(asyncio.DatagramProtocol):
    """The agent's tickle port: a real UDP socket that keeps what it receives."""

    def __init__(self) -> None:
        self.datagrams: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.datagrams.append(data)

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass
class Agent:
    """A registered fake agent: its credentials and its tickle socket."""

    name: str
    token: str
    key: bytes
    socket: FakeAgentSocket
    enrollment: AgentEnrollment

    def tickles(self, ts_name: str) -> list[wire.Tickle]:
        """Every received datagram, verified as the task server's (raises if one is not)."""
        guard = wire.TickleGuard(keys={ts_name: self.key})
        return [guard.check(d) for d in self.socket.datagrams]


class TaskServerHarness:
    """A task server in this process, with helpers to play its agents."""

    def __init__(self, ns: FakeNs, state_dir: Path, **overrides: Any) -> None:
        self.ns = ns
        self.state_dir = state_dir
        self.overrides = overrides
        self.ts: TaskServer | None = None
        self._sockets: list[FakeAgentSocket] = []
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    def settings(self) -> TaskServerSettings:
        values: dict[str, Any] = {
            "name": "ts1",
            "ns_url": self.ns.url,
            "enrollment_secret": SECRET,
            "agent_enrollment_secret": AGENT_SECRET,
            "api_host": "127.0.0.1",
            "api_port": 0,
            "tickle_host": "127.0.0.1",
            "tickle_port": 0,
            "state_dir": self.state_dir,
            "tickle_tries": 3,
            "tickle_backoff_s": 0.1,
            "tickle_backoff_max_s": 0.3,
            "ns_wait_s": 10,
            "ns_timeout_s": 2,
        }
        values.update(self.overrides)
        return load_settings(TaskServerSettings, [], **values)

    async def start(self) -> TaskServer:
        self.ts = TaskServer(self.settings())
        try:
            await self.ts.start()
        except BaseException:
            await self.ts.stop()
            raise
        return self.ts

    def pin_ports(self) -> None:
        """Restart on the ports bound now (a real restart keeps its configured ports)."""
        self.overrides["api_port"] = self.running.api_port
        self.overrides["tickle_port"] = self.running.tickle_port

    async def stop(self) -> None:
        if self.ts is not None:
            await self.ts.stop()
            self.ts = None

    async def close(self) -> None:
        await self.stop()
        await self.http.close()
        for s in self._sockets:
            s.close()

    @property
    def running(self) -> TaskServer:
        assert self.ts is not None
        return self.ts

    async def reported(self, within_s: float = 5.0) -> bool:
        """Wait until what the task server queued so far is committed (its hop reports wait for
        a commit to ride, `work_cache.HOP_COMMIT_S`) and forwarded: whether the outbox drained."""
        cache = self.running.work_cache
        await wait_until(lambda: cache.uncommitted == 0, within_s, "the work cache's commits")
        return await self.running.forwarder.drained(within_s)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.running.api_port}"

    def send_tickle(self, datagram: bytes) -> None:
        """Send a datagram to the TS's tickle port from a short-lived socket."""
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(datagram, ("127.0.0.1", self.running.tickle_port))

    async def cache_work(self, *work: ExecutionWork) -> None:
        """The NS holds this work for the task server's clients; a periodic check caches it."""
        self.ns.work = list(work)
        await self.running.sync.work.run("check")

    async def register_agent(self, name: str, cem: bool = False, **kw: Any) -> Agent:
        loop = asyncio.get_running_loop()
        _, sock = await loop.create_datagram_endpoint(FakeAgentSocket, local_addr=("127.0.0.1", 0))
        self._sockets.append(sock)
        body = AgentRegister(
            enrollment_secret=AGENT_SECRET,
            name=name,
            tickle_host=None if cem else "127.0.0.1",
            tickle_port=sock.port,
            cem=cem,
            reported_address=kw.get("reported_address", "127.0.0.1"),
        )
        enrollment: AgentEnrollment = await request(
            self.http, "POST", f"{self.url}/api/agent/register", body=body, answer=AgentEnrollment
        )
        return Agent(name, enrollment.token, base64.b64decode(enrollment.tickle_key), sock,
                     enrollment)  # fmt: skip

    async def call(self, agent: Agent | None, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        """Call the TS API as `agent` (None: no credentials); (status, parsed JSON or text)."""
        headers = {"Authorization": f"Bearer {agent.token}"} if agent else {}
        headers.update(kw.pop("headers", {}))
        async with self.http.request(method, self.url + path, headers=headers, **kw) as resp:
            text = await resp.text()
            try:
                return resp.status, await resp.json(content_type=None)
            except ValueError:
                return resp.status, text


@pytest.fixture
async def fake_ns() -> AsyncIterator[FakeNs]:
    ns = FakeNs()
    await ns.start()
    yield ns
    await ns.stop()


@pytest.fixture
async def harness(fake_ns: FakeNs, tmp_path: Path) -> AsyncIterator[TaskServerHarness]:
    h = TaskServerHarness(fake_ns, tmp_path / "ts")
    yield h
    await h.close()


@pytest.fixture
async def task_server(harness: TaskServerHarness) -> TaskServerHarness:
    """A started task server (its first work pull done)."""
    await harness.start()
    await wait_until(lambda: harness.ns.count("work") >= 1, what="the first work pull")
    return harness
