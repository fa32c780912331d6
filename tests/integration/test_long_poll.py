"""Long-poll: an agent that cannot be tickled holds one request open to its task server and starts
work within a second, with no inbound UDP at all; real processes on loopback.

That long-poll is off by default (the CEM agent only polls) is checked in test_delivery.py.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable

import pytest

from tickle.console import timeline_times
from tickle.messages import SettingsUpdate
from tickle.testing.localfleet import AgentSpec, LocalFleet

from .conftest import (
    Factory,
    agent_ctl,
    eventually,
    metric,
    run_command,
    tickle_cli,
    udp_inodes_of,
    wait_run,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


async def _long_poll_on(fleet: LocalFleet, agent: str) -> None:
    """Turn long-poll on at the NS, as an operator does; the agent takes it at its next contact
    (a policy refresh)."""
    done = tickle_cli(fleet, "settings", "set", "--long-poll", "--json")
    assert done.returncode == 0, done.stderr
    assert '"long_poll": true' in done.stdout
    ts = fleet.ts_url("ts1")

    async def agent_long_polls() -> bool:
        agent_ctl(fleet, agent, "policy-refresh")
        return await metric(ts, "tickle_long_polls_waiting") == 1

    await eventually(agent_long_polls, 30, "the agent's long-poll to wait at the task server", 0.5)


async def _delivered_by_long_poll(fleet: LocalFleet, agent: str, cem: bool = True) -> float:
    """Run a command on `agent`; check it came by long-poll (and, to a CEM agent, no tickle was
    sent); the seconds from the run's creation to the agent's pull."""
    run = await run_command(fleet, [agent], ["true"])
    run = await wait_run(fleet, run.id, 30)
    execution = run.executions[0]
    assert execution.status == "succeeded", execution
    assert execution.via == "long_poll"
    times = timeline_times(execution)
    if cem:
        assert times["agent_tickled"] is None
    created, pulled = times["created"], times["agent_pulled"]
    assert created is not None
    assert pulled is not None
    return pulled - created


async def test_cem_agent_long_polls_and_starts_work_within_a_second_without_udp_or_tickles(
    fleet_factory: Factory,
) -> None:
    fleet = await fleet_factory(["ts1"], [AgentSpec("cem1", ["ts1"], cem=True)])
    pid = fleet.procs["cem1"].popen.pid  # type: ignore[union-attr]
    await _long_poll_on(fleet, "cem1")
    assert '"long_polling": true' in agent_ctl(fleet, "cem1", "status").stdout
    # the interval is 1800 s and the agent takes no tickle: only the long-poll explains this
    assert await _delivered_by_long_poll(fleet, "cem1") < 1.0
    assert udp_inodes_of(pid) == set(), "a CEM agent must open no UDP socket, long-poll or not"
    ts = fleet.ts_url("ts1")
    assert await metric(ts, "tickle_tickles_sent_total", kind="tasks") == 0
    assert await metric(ts, "tickle_tickles_sent_total", kind="settings") == 0
    assert await metric(ts, "tickle_long_polls_woken_total") >= 1
    assert await metric(ts, "tickle_pulls_total", via="long_poll") >= 1

    # re-armed: the next run comes the same way
    await eventually(
        lambda: _equals(metric(ts, "tickle_long_polls_waiting"), 1), 10, "the re-armed long-poll"
    )
    assert await _delivered_by_long_poll(fleet, "cem1") < 1.0


async def test_settings_change_answers_the_long_poll_at_once(fleet_factory: Factory) -> None:
    fleet = await fleet_factory(["ts1"], [AgentSpec("cem1", ["ts1"], cem=True)])
    await _long_poll_on(fleet, "cem1")
    started = time.monotonic()
    async with fleet.client() as ns:
        await ns.update_settings(SettingsUpdate(task_request_interval_s=4321))

    async def agent_has_it() -> bool:
        return '"task_request_interval_s": 4321' in agent_ctl(fleet, "cem1", "status").stdout

    await eventually(agent_has_it, 10, "the CEM agent to hold the new interval")
    # a poll would have taken 1800 s: the long-poll's answer carried the new settings
    assert time.monotonic() - started < 10
    ts = fleet.ts_url("ts1")
    assert await metric(ts, "tickle_tickles_sent_total", kind="settings") == 0


async def test_long_poll_survives_a_task_server_restart(fleet_factory: Factory) -> None:
    fleet = await fleet_factory(["ts1"], [AgentSpec("cem1", ["ts1"], cem=True)])
    await _long_poll_on(fleet, "cem1")
    fleet.kill("ts1")
    fleet.spawn("ts1")
    ts = fleet.ts_url("ts1")
    await fleet.wait_healthy(ts, "ts1", 30)
    # the agent backs off while the task server is down, then re-arms at the new one
    await eventually(
        lambda: _equals(metric(ts, "tickle_long_polls_waiting"), 1), 90,
        "the agent's long-poll at the restarted task server", 0.5,
    )  # fmt: skip
    await _delivered_by_long_poll(fleet, "cem1")
    assert await metric(ts, "tickle_tickles_sent_total", kind="tasks") == 0


async def _equals(value: Awaitable[float], expected: float) -> bool:
    return await value == expected


async def _at_least(value: Awaitable[float], expected: float) -> bool:
    return await value >= expected


async def test_tickle_unreachable_agent_long_polls_once_declared_so(fleet_factory: Factory) -> None:
    fleet = await fleet_factory(
        ["ts1"], [AgentSpec("blocked", ["ts1"], blocked=True)],
        ts_extra=["--tickle-tries", "3", "--tickle-backoff-s", "0.2", "--tickle-backoff-max-s", "0.5"],
    )  # fmt: skip
    ts = fleet.ts_url("ts1")
    done = tickle_cli(fleet, "settings", "set", "--long-poll", "--json")
    assert done.returncode == 0, done.stderr
    # its tickles are lost: the first run waits (interval 1800 s) until check-now, and the
    # task server declares the agent tickle-unreachable (by the run's tickle, or by the settings
    # tickle the change above sent it: both may end within one look at the metric, 0 -> 2)
    first = await run_command(fleet, ["blocked"], ["true"])
    await eventually(
        lambda: _at_least(metric(ts, "tickle_tickles_unreachable_total"), 1), 30,
        "the task server to declare the agent tickle-unreachable",
    )  # fmt: skip
    assert agent_ctl(fleet, "blocked", "check-now").returncode == 0
    assert (await wait_run(fleet, first.id, 30)).executions[0].via == "check_now"
    # that pull's policy turned its long-poll on
    await eventually(
        lambda: _equals(metric(ts, "tickle_long_polls_waiting"), 1), 30, "the long-poll", 0.5
    )
    # it is no CEM agent: its task server still tickles it, and the long-poll is what arrives
    assert await _delivered_by_long_poll(fleet, "blocked", cem=False) < 1.0
