"""Fixtures for the notification server: a real NS (uvicorn on 127.0.0.1, SQLite file) and fake
task servers that register over HTTP and listen for tickles on a real UDP socket."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import Engine
from sqlalchemy import event as sa_event

from tickle import messages as m
from tickle import wire
from tickle.metrics import ComponentMetrics
from tickle.ns.api import create_app
from tickle.ns.settings import NsSettings
from tickle.ns.stores import Stores
from tickle.ns.tickle_server import TickleServer
from tickle.serving import ServingConfig

ADMIN = "admin-token-for-tests-0123456789"
SECRET = "enrollment-secret-for-tests-0123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(
    check: Callable[[], Awaitable[Any]], within: float = 5.0, interval: float = 0.05
) -> Any:
    """Poll `check` until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s (last: {value!r})")
        await asyncio.sleep(interval)


@contextlib.contextmanager
def commits_of(engine: Engine) -> Iterator[list[list[str]]]:
    """The SQL statements of each transaction `engine` commits meanwhile, one list a commit."""
    statements: dict[int, list[str]] = {}
    commits: list[list[str]] = []

    def executed(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.setdefault(id(conn), []).append(statement)

    def committed(conn: Any) -> None:
        commits.append(statements.pop(id(conn), []))

    sa_event.listen(engine, "after_cursor_execute", executed)
    sa_event.listen(engine, "commit", committed)
    try:
        yield commits
    finally:
        sa_event.remove(engine, "after_cursor_execute", executed)
        sa_event.remove(engine, "commit", committed)


@dataclass
class Ns:
    url: str
    settings: NsSettings
    stores: Stores
    metrics: ComponentMetrics
    http: aiohttp.ClientSession
    tickle_server: TickleServer
    app: FastAPI

    async def call(
        self, method: str, path: str, token: str | None = ADMIN, json: Any = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.request(method, self.url + path, json=json, headers=headers) as r:
            body = await r.json() if r.content_type == "application/json" else await r.text()
            return r.status, body

    async def ok(self, method: str, path: str, token: str | None = ADMIN, json: Any = None) -> Any:
        status, body = await self.call(method, path, token, json)
        assert status < 300, (status, body)
        return body

    async def task_server(self, name: str = "ts1") -> FakeTaskServer:
        ts = FakeTaskServer(self, name)
        await ts.start()
        return ts

    async def run_task(self, computers: list[str], name: str = "hello") -> dict[str, Any]:
        task = await self.ok("POST", "/api/tasks", json={"name": name, "command": ["true"]})
        return dict(
            await self.ok("POST", "/api/runs", json={"task_id": task["id"], "computers": computers})
        )


class _Collect(asyncio.DatagramProtocol):
    def __init__(self, queue: asyncio.Queue[tuple[bytes, float]]) -> None:
        self.queue = queue

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.queue.put_nowait((data, time.monotonic()))


@dataclass
class FakeTaskServer:
    """Plays a task server: registers over HTTP, verifies tickles with wire.TickleGuard."""

    ns: Ns
    name: str
    token: str = ""
    key: bytes = b""
    port: int = 0
    queue: asyncio.Queue[tuple[bytes, float]] = field(default_factory=asyncio.Queue)
    transport: asyncio.DatagramTransport | None = None
    guard: wire.TickleGuard | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(
            lambda: _Collect(self.queue), local_addr=("127.0.0.1", 0)
        )
        self.port = self.transport.get_extra_info("sockname")[1]
        await self.register()

    async def register(self) -> dict[str, Any]:
        creds = await self.ns.ok(
            "POST",
            "/api/ts/register",
            token=None,
            json={
                "enrollment_secret": SECRET,
                "name": self.name,
                "tickle_host": "127.0.0.1",
                "tickle_port": self.port,
                "api_url": f"http://127.0.0.1:{self.port}",
            },
        )
        self.token = creds["token"]
        self.key = base64.b64decode(creds["tickle_key"])
        self.guard = wire.TickleGuard({creds["ns_id"]: self.key})
        return dict(creds)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def tickle(self, within: float = 3.0) -> tuple[wire.Tickle, float]:
        """The next datagram, verified (raises TickleRejected if it is not a valid tickle)."""
        data, at = await asyncio.wait_for(self.queue.get(), within)
        assert self.guard is not None
        return self.guard.check(data), at

    async def no_tickle(self, within: float) -> None:
        with contextlib.suppress(TimeoutError):
            data, _ = await asyncio.wait_for(self.queue.get(), within)
            raise AssertionError(f"unexpected datagram {data!r}")

    async def call(self, method: str, path: str, json: Any = None) -> tuple[int, Any]:
        return await self.ns.call(method, path, token=self.token, json=json)

    async def ok(self, method: str, path: str, json: Any = None) -> Any:
        return await self.ns.ok(method, path, token=self.token, json=json)

    async def agent(self, name: str, **fields: Any) -> dict[str, Any]:
        body = {"name": name, "tickle_host": "127.0.0.1", "tickle_port": 50124, **fields}
        return dict(await self.ok("POST", "/api/ts/agents/register", json=body))


NsFactory = Callable[..., Awaitable[Ns]]


@pytest.fixture
async def ns_factory(tmp_path: Path) -> AsyncIterator[NsFactory]:
    """Start a real NS in this event loop: `await ns_factory(tickle_tries=3, ...)`."""
    running: list[tuple[uvicorn.Server, asyncio.Task[None], TickleServer, Stores, Ns]] = []
    fakes: list[FakeTaskServer] = []

    async def start(**overrides: Any) -> Ns:
        values: dict[str, Any] = {
            "state_dir": tmp_path / f"ns{len(running)}",
            "api_port": free_port(),
            "admin_token": ADMIN,
            "enrollment_secret": SECRET,
            "tickle_backoff_s": 0.2,
            "tickle_backoff_max_s": 0.4,
            "tickle_tries": 4,
            "dispatch_poll_s": 0.1,
            **overrides,
        }
        settings = NsSettings(**values)
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        settings = settings.with_secrets()  # as `tickle ns` reads them at start
        stores = Stores.open(settings.db_url)
        stores.database.migrate()
        metrics = ComponentMetrics("ns")
        tickle_server = TickleServer(settings, stores, metrics)
        app = create_app(settings, stores, tickle_server, metrics)
        server = uvicorn.Server(
            ServingConfig(app, settings, metrics, host="127.0.0.1", port=settings.api_port,
                          log_config=None)
        )  # fmt: skip
        await tickle_server.start()
        task = asyncio.create_task(server.serve())
        deadline = time.monotonic() + 10
        while not server.started:
            assert not task.done(), "uvicorn stopped during start"
            assert time.monotonic() < deadline, "uvicorn did not start"
            await asyncio.sleep(0.01)
        http = aiohttp.ClientSession()
        ns = Ns(
            f"http://127.0.0.1:{settings.api_port}",
            settings,
            stores,
            metrics,
            http,
            tickle_server,
            app,
        )
        original = ns.task_server

        async def task_server(name: str = "ts1") -> FakeTaskServer:
            fake = await original(name)
            fakes.append(fake)
            return fake

        ns.task_server = task_server  # type: ignore[method-assign]
        running.append((server, task, tickle_server, stores, ns))
        return ns

    yield start
    for fake in fakes:
        fake.close()
    for server, task, tickle_server, stores, ns in running:
        await ns.http.close()
        server.should_exit = True
        await task
        await tickle_server.close()
        stores.close()


@pytest.fixture
async def ns(ns_factory: NsFactory) -> Ns:
    return await ns_factory()


def event(execution_id: int, computer: str, kind: str, at: float, **fields: Any) -> dict[str, Any]:
    """A status event body as a task server forwards it."""
    import uuid

    return m.StatusEvent.model_validate(
        {
            "event_id": str(uuid.uuid4()),
            "execution_id": execution_id,
            "computer": computer,
            "kind": kind,
            "at": at,
            **fields,
        }
    ).model_dump(mode="json")
