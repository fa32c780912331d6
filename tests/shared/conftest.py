"""What the tests of the shared modules have in common: small real HTTP servers on loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from aiohttp import web
from starlette.types import ASGIApp

from tickle.config import ApiServerSettings
from tickle.metrics import ComponentMetrics
from tickle.serving import ServingConfig

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def serving(routes: dict[str, Handler]) -> AsyncIterator[str]:
    """An aiohttp server on 127.0.0.1 answering GET on each path of `routes`; yields its URL."""
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def serving_app(
    app: ASGIApp, limits: ApiServerSettings | None = None, **options: Any
) -> AsyncIterator[tuple[int, ServingConfig]]:
    """`app` served by uvicorn as the servers serve theirs (`ServingConfig`, `limits` or the
    default ones, and uvicorn's `options`) on 127.0.0.1; yields its port and the configuration."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    config = ServingConfig(app, limits or ApiServerSettings(), ComponentMetrics("t"),
                           host="127.0.0.1", port=port, log_config=None, **options)  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):  # uvicorn starts, or says why not
        while not (server.started or task.done()):
            await asyncio.sleep(0.01)
    assert server.started, task.exception() if task.done() else "uvicorn did not start"
    try:
        yield port, config
    finally:
        server.should_exit = True
        await task
