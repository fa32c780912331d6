"""The agent against the real task server (in this process, with a fake NS behind it)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.taskserver.conftest import AGENT_SECRET, FakeNs, TaskServerHarness, work_for
from tickle.agent.settings import AgentSettings
from tickle.config import load_settings

from .conftest import eventually, free_udp_port, running_agent

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
async def real_ts(tmp_path: Path) -> AsyncIterator[TaskServerHarness]:
    ns = FakeNs()
    await ns.start()
    harness = TaskServerHarness(ns, tmp_path / "ts")
    try:
        await harness.start()
        await eventually(lambda: ns.count("work") >= 1, what="the task server's first work pull")
        yield harness
    finally:
        await harness.close()
        await ns.stop()


async def test_ns_tickle_reaches_agent_through_real_task_server_and_status_comes_back(
    real_ts: TaskServerHarness, tmp_path: Path, short_dir: Path
) -> None:
    ns = real_ts.ns
    settings = load_settings(
        AgentSettings, [], name="agent1", task_servers=[real_ts.url], enrollment_secret=AGENT_SECRET,
        tickle_host="127.0.0.1", tickle_port=free_udp_port(), state_dir=tmp_path / "agent",
        control_socket=short_dir / "agent.sock", stop_grace_s=0.0,
    )  # fmt: skip
    async with running_agent(settings) as agent:
        assert agent.client.credentials is not None
        assert ns.agent_registrations[0].name == "agent1"
        assert ns.agent_registrations[0].reported_address == "127.0.0.1"
        ns.work = [work_for(61, "agent1")]
        real_ts.send_tickle(ns.tickle())  # NS -> TS -> agent, each pulling
        finished = await eventually(
            lambda: [e for e in ns.events_of("finished") if e.execution_id == 61],
            within_s=10.0, what="the finished event at the NS",
        )  # fmt: skip
    assert finished[0].status == "succeeded"
    assert finished[0].output_tail == "hi\n"
    started = [e for e in ns.events_of("started") if e.execution_id == 61]
    assert started[0].via == "tickle"
    pulled = [e for e in ns.events_of("agent_pulled") if e.execution_id == 61]
    assert pulled
    assert pulled[0].via == "tickle"
