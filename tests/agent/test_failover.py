"""Failover: an agent whose task server stays unreachable registers with the next one."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import pytest

import tickle
from tickle.agent.settings import AgentSettings

from .conftest import eventually, running_agent, task
from .fake_ts import FakeTaskServer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def fakes() -> AsyncIterator[list[FakeTaskServer]]:
    servers = [FakeTaskServer(name=f"ts{i}") for i in (1, 2, 3)]
    for ts in servers:
        await ts.start()
    yield servers
    for ts in servers:
        await ts.close()


def _port(ts: FakeTaskServer) -> int:
    return int(ts.url.rsplit(":", 1)[1])


async def test_agent_fails_over_to_the_next_task_server_and_gets_work_there(
    fakes: list[FakeTaskServer], settings_for: Callable[..., AgentSettings]
) -> None:
    ts1, ts2, _ = fakes
    settings = settings_for(
        ts1, task_servers=[ts1.url, ts2.url], failover_after_s=1.0, failover_check_interval_s=0.2
    )
    async with running_agent(settings) as agent:
        assert agent.status()["task_server"] == "ts1"
        assert agent.status()["version"] == tickle.__version__  # what upgrade.yml waits for
        ts2.work[7] = task(7, ["true"])
        await ts1.close()
        down_at = time.monotonic()
        await eventually(lambda: agent.status()["task_server"] == "ts2", 10.0, "failover to ts2")
        moved_after = time.monotonic() - down_at
        await eventually(lambda: ts2.events_of(7, "finished"), 10.0, "execution 7 via ts2")
        assert agent.status()["failovers"] == 1
    assert 1.0 <= moved_after < 5.0, moved_after
    assert [r.name for r in ts2.registrations] == ["agent1"]
    assert ts2.events_of(7, "finished")[0].status == "succeeded"


async def test_no_failover_while_the_task_server_answers_its_health_checks(
    fakes: list[FakeTaskServer], settings_for: Callable[..., AgentSettings]
) -> None:
    ts1, ts2, _ = fakes
    settings = settings_for(
        ts1, task_servers=[ts1.url, ts2.url], failover_after_s=0.3, failover_check_interval_s=0.1
    )
    async with running_agent(settings) as agent:
        await eventually(lambda: ts1.routes().count("health") >= 8, 10.0, "eight health checks")
        assert agent.status()["task_server"] == "ts1"
    assert ts2.calls == []


async def test_a_single_task_server_is_never_health_checked_or_left(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings]
) -> None:
    settings = settings_for(fake_ts, failover_after_s=0.3, failover_check_interval_s=0.1)
    async with running_agent(settings) as agent:
        assert not agent.failover.enabled
        await fake_ts.close()
        # a pull that fails counts as a failed contact, but there is nowhere to go
        await agent.poller.pull_quietly("check_now")
        assert await agent.failover.check_once() is False
        assert agent.client.unreachable_for() > 0
        assert agent.status()["task_server"] == "ts1"
    assert "health" not in fake_ts.routes()


async def test_failover_goes_down_the_list_and_wraps_around(
    fakes: list[FakeTaskServer], settings_for: Callable[..., AgentSettings]
) -> None:
    ts1, ts2, ts3 = fakes
    settings = settings_for(
        ts1,
        task_servers=[ts1.url, ts2.url, ts3.url],
        failover_after_s=0.5,
        failover_check_interval_s=0.1,
    )
    async with running_agent(settings) as agent:

        def on(name: str) -> Callable[[], bool]:
            return lambda: agent.status()["task_server"] == name

        port1 = _port(ts1)
        await ts1.close()
        await eventually(on("ts2"), 10.0, "ts1 -> ts2 (the next, not ts3)")
        await ts1.start(port=port1)  # back, but the agent stays where it is
        await ts2.close()
        await eventually(on("ts3"), 10.0, "ts2 -> ts3")
        await ts3.close()
        await eventually(on("ts1"), 10.0, "ts3 -> ts1 (wrapping around)")
        assert agent.status()["failovers"] == 3


async def test_no_reachable_task_server_keeps_the_credentials_and_tries_again(
    fakes: list[FakeTaskServer], settings_for: Callable[..., AgentSettings]
) -> None:
    ts1, ts2, _ = fakes
    settings = settings_for(
        ts1, task_servers=[ts1.url, ts2.url], failover_after_s=0.3, failover_check_interval_s=0.1
    )
    async with running_agent(settings) as agent:
        port2 = _port(ts2)
        await ts2.close()
        await ts1.close()
        since = time.time()
        ts2.calls.clear()
        await eventually(lambda: agent.client.unreachable_for() > 0.6, 10.0, "a long outage")
        assert agent.status()["task_server"] == "ts1"  # nowhere to go: stays
        await ts2.start(port=port2)
        await eventually(lambda: agent.status()["task_server"] == "ts2", 10.0, "ts2 once back")
    assert "register" in ts2.routes(since=since)
