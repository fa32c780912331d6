"""`tickle agent` as a real process (its own pid, signals, subreaper), for tests that need one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from tickle.agent.control import control_call

from .conftest import eventually
from .fake_ts import FakeTaskServer

AGENT = "import sys; from tickle.agent.start import main; sys.exit(main(sys.argv[1:]))"


class AgentProcess:
    """`tickle agent` in a subprocess, its stderr in a file."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path, socket: Path) -> None:
        self.proc = proc
        self.log = log
        self.socket = socket

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        try:
            return await asyncio.wait_for(self.proc.wait(), 15.0)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(f"agent did not stop:\n{self.log.read_text()}") from None

    async def control(self, method: str, path: str) -> dict[str, object]:
        return await control_call(self.socket, method, path)


@contextlib.asynccontextmanager
async def agent_process(
    fake: FakeTaskServer, state_dir: Path, sock_dir: Path, *flags: str, **env: str
) -> AsyncIterator[AgentProcess]:
    log = state_dir.parent / f"agent-{len(list(state_dir.parent.glob('agent-*.log')))}.log"
    socket_path = sock_dir / "agent.sock"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TICKLE_")}
    environ.update({"TICKLE_AGENT_ENROLLMENT_SECRET": fake.secret, **env})
    args = ["--name", "agent1", "--task-servers", fake.url, "--state-dir", str(state_dir),
            "--control-socket", str(socket_path), "--stop-grace-s", "0", *flags]  # fmt: skip
    with log.open("w") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", AGENT, *args, stdout=err, stderr=err, env=environ
        )
    agent = AgentProcess(proc, log, socket_path)
    try:
        yield agent
    finally:
        await agent.stop(signal.SIGKILL if proc.returncode is None else signal.SIGTERM)


async def first_pull(fake: FakeTaskServer, agent: AgentProcess) -> None:
    await eventually(
        lambda: fake.pulls() or agent.proc.returncode is not None, within_s=15.0, what="first pull"
    )
    assert agent.proc.returncode is None, agent.log.read_text()
