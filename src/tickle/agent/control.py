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
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Protocol

from tickle import clock
from tickle.agent.h11http import Answer, HttpClient, HttpServer, json_answer
from tickle.agent.settings import AgentSettings
from tickle.httpbase import ApiError
from tickle.metrics import Metrics
from tickle.settingsbase import ConfigError, load_settings

# how long a control command waits for the agent's answer (a check-now waits for the pull)
CONTROL_TIMEOUT_S = 60.0
ACTIONS: dict[str, tuple[str, str]] = {
    "check-now": ("POST", "/check-now"),
    "policy-refresh": ("POST", "/policy-refresh"),
    "status": ("GET", "/status"),
}


class Controlled(Protocol):
    """What the control API needs from the running agent."""

    @property
    def metrics(self) -> Metrics: ...

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
    except TimeoutError:
        print(
            f"tickle agent: the agent at {settings.socket_path} did not answer within"
            f" {CONTROL_TIMEOUT_S:.0f} s",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
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
    client = HttpClient(unix_path=str(socket_path), timeout_s=CONTROL_TIMEOUT_S)
    try:
        resp = await client.request(method, f"http://agent{path}")
    finally:
        await client.close()
    if resp.status >= 400:
        raise ApiError(resp.status, resp.body.decode(errors="replace"), path)
    answer: Any = json.loads(resp.body)
    if not isinstance(answer, dict):
        return {"result": answer}
    return answer


class ControlServer:
    """Serves the control API on the unix socket, and /metrics on TCP when a port is set."""

    def __init__(self, agent: Controlled, socket_path: Path) -> None:
        self._agent = agent
        self._socket_path = socket_path
        self._servers: list[HttpServer] = []

    async def start(self, metrics_host: str | None = None, metrics_port: int = 0) -> None:
        server = HttpServer(
            {
                ("POST", "/check-now"): self._check_now,
                ("POST", "/policy-refresh"): self._policy_refresh,
                ("GET", "/status"): self._status,
                ("GET", "/metrics"): self._metrics,
            }
        )
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
        await server.serve_socket(sock)
        self._servers.append(server)
        if metrics_host and metrics_port:
            # only metrics on TCP: the control actions stay on the private socket
            metrics_server = HttpServer({("GET", "/metrics"): self._metrics})
            await metrics_server.serve_tcp(metrics_host, metrics_port)
            self._servers.append(metrics_server)

    async def close(self) -> None:
        for server in reversed(self._servers):
            await server.close()
        self._servers.clear()
        if self._socket_path.is_socket():
            self._socket_path.unlink()

    async def _check_now(self) -> Answer:
        return await _answer(self._agent.check_now())

    async def _policy_refresh(self) -> Answer:
        return await _answer(self._agent.policy_refresh())

    async def _status(self) -> Answer:
        return json_answer(self._agent.status())

    async def _metrics(self) -> Answer:
        body, content_type = self._agent.metrics.render()
        return 200, content_type, body


async def _answer(action: Awaitable[dict[str, Any]]) -> Answer:
    try:
        result = await action
    except Exception as exc:  # the task server is down, refused us, ...: say so to the caller
        return json_answer({"error": f"{type(exc).__name__}: {exc}"}, status=502)
    return json_answer(result)
