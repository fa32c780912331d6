"""The agent's local control API on a unix socket (mode 0600), and its command-line client.

POST /check-now pulls at once (via `check_now`) and says what ran; POST /policy-refresh reads the
policy only and never fetches tasks; GET /status and GET /metrics describe the agent. The CLI
commands `tickle agent check-now | policy-refresh | status` call `run_control_command`.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from tickle import clock
from tickle.agent.settings import AgentSettings
from tickle.config import ConfigError, load_settings
from tickle.http import ApiError
from tickle.metrics import ComponentMetrics

ACTIONS: dict[str, tuple[str, str]] = {
    "check-now": ("POST", "/check-now"),
    "policy-refresh": ("POST", "/policy-refresh"),
    "status": ("GET", "/status"),
}


class Controlled(Protocol):
    """What the control API needs from the running agent."""

    metrics: ComponentMetrics

    async def check_now(self) -> dict[str, Any]: ...

    async def policy_refresh(self) -> dict[str, Any]: ...

    def status(self) -> dict[str, Any]: ...


def run_control_command(settings_args: list[str], action: str) -> int:
    """CLI entry: find the agent's control socket from its settings, call it, print the JSON."""
    if action not in ACTIONS:
        print(f"tickle agent: unknown action {action!r}", file=sys.stderr)
        return 2
    try:
        # the secret only matters to a running agent; a control command must work without it
        settings = load_settings(AgentSettings, settings_args, enrollment_secret="unused")  # noqa: S106
    except ConfigError as exc:
        print(f"tickle agent: {exc}", file=sys.stderr)
        return 2
    method, path = ACTIONS[action]
    try:
        result = asyncio.run(control_call(settings.socket_path, method, path))
    except (OSError, aiohttp.ClientError) as exc:
        print(
            f"tickle agent: cannot reach the agent at {settings.socket_path}: {exc}",
            file=sys.stderr,
        )
        return 1
    except ApiError as exc:
        print(f"tickle agent: {action} failed: {exc.detail}", file=sys.stderr)
        return 1
    # times in ISO 8601, as in every JSON the CLI prints
    print(json.dumps(clock.iso_times(result), indent=2, sort_keys=True))
    return 0


async def control_call(socket_path: Path | str, method: str, path: str) -> dict[str, Any]:
    """Call the control API of the agent listening on `socket_path`; return its JSON answer."""
    connector = aiohttp.UnixConnector(path=str(socket_path))
    timeout = aiohttp.ClientTimeout(total=60)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        session.request(method, f"http://agent{path}") as resp,
    ):
        raw = await resp.read()
        if resp.status >= 400:
            raise ApiError(resp.status, raw.decode(errors="replace"), path)
    answer: Any = json.loads(raw)
    if not isinstance(answer, dict):
        return {"result": answer}
    return answer


class ControlServer:
    """Serves the control API on the unix socket, and /metrics on TCP when a port is set."""

    def __init__(self, agent: Controlled, socket_path: Path) -> None:
        self._agent = agent
        self._socket_path = socket_path
        self._runners: list[web.AppRunner] = []

    async def start(self, metrics_host: str | None = None, metrics_port: int = 0) -> None:
        app = web.Application()
        app.router.add_post("/check-now", self._check_now)
        app.router.add_post("/policy-refresh", self._policy_refresh)
        app.router.add_get("/status", self._status)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        self._socket_path.parent.mkdir(parents=True, exist_ok=True)
        if self._socket_path.is_socket():  # left over by an agent that died
            self._socket_path.unlink()
        # created 0600: no window where others may connect. Bound here, with no await while the
        # process umask is changed: agents sharing a loop would restore it out of order
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(self._socket_path))
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        os.chmod(self._socket_path, 0o600)
        await web.SockSite(runner, sock).start()
        if metrics_host and metrics_port:
            # only metrics on TCP: the control actions stay on the private socket
            metrics_app = web.Application()
            metrics_app.router.add_get("/metrics", self._metrics)
            metrics_runner = web.AppRunner(metrics_app, access_log=None)
            await metrics_runner.setup()
            self._runners.append(metrics_runner)
            await web.TCPSite(metrics_runner, metrics_host, metrics_port).start()

    async def close(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        if self._socket_path.is_socket():
            self._socket_path.unlink()

    async def _check_now(self, request: web.Request) -> web.Response:
        return await _answer(self._agent.check_now())

    async def _policy_refresh(self, request: web.Request) -> web.Response:
        return await _answer(self._agent.policy_refresh())

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self._agent.status())

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = self._agent.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})


async def _answer(action: Any) -> web.Response:
    try:
        result = await action
    except Exception as exc:  # the task server is down, refused us, ...: say so to the caller
        return web.json_response({"error": f"{type(exc).__name__}: {exc}"}, status=502)
    return web.json_response(result)
