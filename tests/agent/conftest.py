"""Fixtures for the agent's tests: a fake task server, agent settings, a running agent."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tickle import wire
from tickle.agent.service import Agent
from tickle.agent.settings import AgentSettings
from tickle.config import load_settings
from tickle.messages import ExecutionWork, TaskSpec
from tickle.metrics import ComponentMetrics

from .fake_ts import FakeTaskServer

_HANDED_OUT: set[int] = set()


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port free now and never handed out before in this process: a test that takes
    several before binding any (sixteen agents) must not get one port twice from the kernel."""
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no UDP port left that this process has not handed out already")


async def eventually(
    condition: Callable[[], Any], within_s: float = 5.0, what: str = "condition"
) -> Any:
    """Wait (bounded) until `condition()` is truthy; return its value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        value = condition()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what}")
        await asyncio.sleep(0.01)


def alive(pid: int) -> bool:
    """Running: in the process table and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def dies(pid: int, within_s: float = 2.0) -> bool:
    """Whether process `pid` is dead (at most a zombie) within `within_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while alive(pid) and loop.time() < deadline:
        await asyncio.sleep(0.01)
    return not alive(pid)


def task(execution_id: int, *commands: list[str], timeout_s: float = 30.0) -> ExecutionWork:
    """An execution: one step is a task, several a job."""
    steps = [
        TaskSpec(name=f"step{i}", command=cmd, timeout_s=timeout_s)
        for i, cmd in enumerate(commands)
    ]
    return ExecutionWork(
        execution_id=execution_id, computer="agent1",
        kind="task" if len(steps) == 1 else "job", steps=steps,
    )  # fmt: skip


def script(execution_id: int, text: str, timeout_s: float = 30.0) -> ExecutionWork:
    return ExecutionWork(
        execution_id=execution_id, computer="agent1", kind="task",
        steps=[TaskSpec(name="script", script=text, timeout_s=timeout_s)],
    )  # fmt: skip


class TickleSender:
    """Sends tickle datagrams to the agent as its task server would."""

    def __init__(self, addr: tuple[str, int], sender: str, key: bytes) -> None:
        self.addr = addr
        self.sender = sender
        self.key = key
        self._seq = wire.SequenceCounter()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def datagram(self, kind: wire.Kind = wire.Kind.TASKS, **kw: Any) -> bytes:
        return wire.encode(kind, kw.pop("sender", self.sender), self._seq.next(),
                           kw.pop("key", self.key), **kw)  # fmt: skip

    def send(self, data: bytes) -> None:
        self._sock.sendto(data, self.addr)

    def tickle(self, kind: wire.Kind = wire.Kind.TASKS) -> bytes:
        data = self.datagram(kind)
        self.send(data)
        return data

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for unix sockets (paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="tka-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def fake_ts() -> AsyncIterator[FakeTaskServer]:
    ts = FakeTaskServer()
    await ts.start()
    yield ts
    await ts.close()


def agent_settings(
    state_dir: Path, fake: FakeTaskServer, sock_dir: Path, **overrides: Any
) -> AgentSettings:
    values: dict[str, Any] = {
        "name": "agent1",
        "task_servers": [fake.url],
        "enrollment_secret": fake.secret,
        "tickle_host": "127.0.0.1",
        "tickle_port": free_udp_port(),
        "state_dir": state_dir,
        "control_socket": sock_dir / "agent.sock",
        "stop_grace_s": 0.0,
    }
    values.update(overrides)
    return load_settings(AgentSettings, [], **values)


@pytest.fixture
def settings_for(tmp_path: Path, short_dir: Path) -> Callable[..., AgentSettings]:
    def make(fake: FakeTaskServer, **overrides: Any) -> AgentSettings:
        return agent_settings(tmp_path / "agent", fake, short_dir, **overrides)

    return make


@contextlib.asynccontextmanager
async def running_agent(settings: AgentSettings) -> AsyncIterator[Agent]:
    """An agent started in this event loop (first pull done), stopped on exit."""
    agent = Agent(settings)
    try:
        await agent.start()
        yield agent
    finally:
        await agent.stop()


@contextlib.contextmanager
def tickle_sender(agent: Agent, fake: FakeTaskServer) -> Iterator[TickleSender]:
    assert agent.tickle_addr is not None
    sender = TickleSender(agent.tickle_addr, fake.name, fake.key)
    try:
        yield sender
    finally:
        sender.close()


class StubAgent:
    """An agent as its control API sees it: does nothing, answers `status` with what it is given."""

    def __init__(self, status: dict[str, Any] | None = None) -> None:
        self.metrics = ComponentMetrics("agent")
        self._status = status or {}

    async def check_now(self) -> dict[str, Any]:
        return {}

    async def policy_refresh(self) -> dict[str, Any]:
        return {}

    def status(self) -> dict[str, Any]:
        return self._status
