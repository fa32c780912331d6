"""The agent as a real process: CEM opens no UDP socket, restarts lose nothing, run nothing twice."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import pytest

from .agent_process import agent_process, first_pull
from .conftest import eventually, free_udp_port, script, task
from .fake_ts import FakeTaskServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def udp_ports_of(pid: int) -> set[int]:
    """The local ports of the UDP sockets process `pid` holds (its fds vs /proc/net/udp*)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def test_listening_agent_process_binds_its_tickle_port(
    fake_ts: FakeTaskServer, tmp_path: Path, short_dir: Path
) -> None:
    port = free_udp_port()
    async with agent_process(
        fake_ts, tmp_path / "state", short_dir, "--tickle-host", "127.0.0.1",
        "--tickle-port", str(port),
    ) as agent:  # fmt: skip
        await first_pull(fake_ts, agent)
        assert port in udp_ports_of(agent.proc.pid)
        assert await agent.stop() == 0


async def test_cem_agent_binds_no_udp_socket_and_gets_work_by_polling(
    fake_ts: FakeTaskServer, tmp_path: Path, short_dir: Path
) -> None:
    fake_ts.policy = fake_ts.policy.model_copy(update={"task_request_interval_s": 2, "cem": True})
    # every call goes through the gateway; the task server URL itself is not even listening
    async with agent_process(
        fake_ts, tmp_path / "state", short_dir, "--cem", "--gateway-url", fake_ts.url,
        "--task-servers", "http://127.0.0.1:9", "--tickle-port", str(free_udp_port()),
    ) as agent:  # fmt: skip
        await first_pull(fake_ts, agent)
        fake_ts.work[31] = task(31, ["true"])
        finished = await eventually(lambda: fake_ts.events_of(31, "finished"), within_s=10.0)
        assert udp_ports_of(agent.proc.pid) == set()
        status = await agent.control("GET", "/status")
        assert await agent.stop() == 0
    assert finished[0].status == "succeeded"
    assert fake_ts.events_of(31, "started")[0].via == "poll"
    assert fake_ts.registrations[0].cem is True
    assert fake_ts.registrations[0].tickle_host is None
    assert status["cem"] is True
    assert status["tickle_listener"] is None


async def test_events_queued_while_ts_down_are_delivered_after_agent_restart(
    fake_ts: FakeTaskServer, tmp_path: Path, short_dir: Path
) -> None:
    state = tmp_path / "state"
    port = str(free_udp_port())
    fake_ts.events_down = True
    async with agent_process(fake_ts, state, short_dir, "--tickle-port", port) as agent:
        await first_pull(fake_ts, agent)
        fake_ts.work[41] = task(41, ["echo", "done"])
        await agent.control("POST", "/check-now")

        async def queued() -> bool:
            status = await agent.control("GET", "/status")
            return status["outbox_depth"] == 2 and status["executions"] == {"succeeded": 1}

        for _ in range(500):
            if await queued():
                break
            await asyncio.sleep(0.02)
        assert await queued()
        assert await agent.stop() == 0
    assert fake_ts.events == []

    fake_ts.events_down = False
    async with agent_process(fake_ts, state, short_dir, "--tickle-port", port) as agent:
        finished = await eventually(lambda: fake_ts.events_of(41, "finished"), within_s=15.0)
        assert await agent.stop() == 0
    assert [e.kind for e in fake_ts.events] == ["started", "finished"]
    assert finished[0].output_tail == "done\n"


async def test_killed_agent_reports_running_execution_interrupted_and_never_reruns_it(
    fake_ts: FakeTaskServer, tmp_path: Path, short_dir: Path
) -> None:
    state = tmp_path / "state"
    marker, pidfile = tmp_path / "runs", tmp_path / "task.pid"
    port = str(free_udp_port())
    fake_ts.keep_serving = True  # the task server keeps offering it: the agent must refuse
    fake_ts.work[51] = script(51, f"echo ran >> {marker}; echo $$ > {pidfile}; exec sleep 60")
    try:
        async with agent_process(fake_ts, state, short_dir, "--tickle-port", port) as agent:
            await eventually(lambda: pidfile.exists() and pidfile.read_text().strip(), 15.0)
            assert await agent.stop(signal.SIGKILL) == -signal.SIGKILL
        async with agent_process(fake_ts, state, short_dir, "--tickle-port", port) as agent:
            finished = await eventually(lambda: fake_ts.events_of(51, "finished"), 15.0)
            again = await agent.control("POST", "/check-now")
            assert await agent.stop() == 0
    finally:
        with contextlib.suppress(ProcessLookupError, ValueError, FileNotFoundError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
    assert finished[0].status == "interrupted"
    assert again == {"via": "check_now", "executions": [51], "started": []}
    assert marker.read_text() == "ran\n"
    assert len(fake_ts.events_of(51, "started")) == 1
