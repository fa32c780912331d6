"""An agent whose clock is 60 s ahead: shown clock-skewed with its offset, not unreachable.

Only that agent's clock is skewed: its process reads the time through the clock
`clock.from_environment` gives it, shifted by the test-only `TICKLE_TEST_CLOCK_OFFSET_S` (honoured
with `TICKLE_TESTING=1` only). It rejects every tickle as stale, exactly as a firewalled agent
loses them; the fleet must tell the two apart, measure the offset, correct its timeline and count
it in the metrics.
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import (
    Factory,
    agent_ctl,
    eventually,
    metric,
    run_command,
    wait_run,
)
from tests.reliability import record
from tickle import clock
from tickle.messages import ComputerOut, ExecutionOut, TimelineStep
from tickle.testing.localfleet import AgentSpec

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(180)]

SKEW_S = 60.0
# the offset is measured on loopback: latency and scheduling move it by milliseconds, not seconds
TOLERANCE_S = 2.0
SHORT_TICKLE_RETRIES = ["--tickle-tries", "3", "--tickle-backoff-s", "0.2",
                        "--tickle-backoff-max-s", "0.5"]  # fmt: skip


async def test_agent_60s_ahead_is_clock_skewed_not_unreachable_and_its_timeline_corrected(
    fleet_factory: Factory,
) -> None:
    skewed_env = {clock.TEST_OFFSET_ENV: str(SKEW_S), clock.TESTING_ENV: "1"}
    fleet = await fleet_factory(
        ["ts1"],
        [
            AgentSpec("ahead", ["ts1"], env=skewed_env),
            AgentSpec("walled", ["ts1"], blocked=True),  # tickles lost: truly unreachable
            AgentSpec("steady", ["ts1"]),
        ],
        ts_extra=SHORT_TICKLE_RETRIES,
    )
    run = await run_command(fleet, ["ahead", "walled", "steady"], ["true"])

    async def states() -> dict[str, ComputerOut] | None:
        async with fleet.client() as ns:
            computers = {c.name: c for c in await ns.computers()}
        wanted = {"ahead": "clock_skewed", "walled": "unreachable", "steady": "reachable"}
        done = all(computers[n].tickle_state == s for n, s in wanted.items())
        return computers if done else None

    computers = await eventually(states, 30, "ahead clock_skewed, walled unreachable")
    ahead = computers["ahead"].clock_offset_s or 0.0
    assert ahead == pytest.approx(SKEW_S, abs=TOLERANCE_S)
    for name in ("walled", "steady"):
        offset = computers[name].clock_offset_s
        assert offset == pytest.approx(0.0, abs=TOLERANCE_S), name

    # the agent saw the stale tickles and said why, in one line
    async def clock_line() -> bool:
        return "this computer's clock is +6" in fleet.log_tail("ahead", 200)

    await eventually(clock_line, 20, "the agent's line about its clock")

    # its work arrives by another way than a tickle: a check-now
    for name in ("ahead", "walled"):
        assert agent_ctl(fleet, name, "check-now").returncode == 0
    run = await wait_run(fleet, run.id, 30)
    by_name = {e.computer: e for e in run.executions}
    assert {e.status for e in run.executions} == {"succeeded"}
    async with fleet.client() as ns:
        timeline = await ns.execution(by_name["ahead"].id)
        steady_timeline = await ns.execution(by_name["steady"].id)
    steps = _steps(timeline)
    for step in ("started", "finished"):
        assert steps[step].corrected, step
        offset = steps[step].clock_offset_s
        assert offset == pytest.approx(SKEW_S, abs=TOLERANCE_S), step
    recorded = steps["recorded"].at
    started, finished = steps["started"].at, steps["finished"].at
    assert recorded is not None
    assert started is not None
    assert finished is not None
    # on the NS's clock the agent started and finished before the NS recorded it; by its own
    # clock (what it reported) a minute after
    assert started <= finished <= recorded
    assert started + SKEW_S > recorded
    assert not any(s.corrected for s in steady_timeline.timeline)

    ts_skewed = await metric(fleet.ts_url("ts1"), "tickle_agents_clock_skewed")
    ts_largest = await metric(fleet.ts_url("ts1"), "tickle_agent_clock_offset_max_seconds")
    ns_skewed = await metric(fleet.ns_url, "tickle_computers_clock_skewed")
    ts_offset = await metric(
        fleet.ns_url, "tickle_task_server_clock_offset_seconds", task_server="ts1"
    )
    declared = await metric(fleet.ts_url("ts1"), "tickle_tickles_unreachable_total")
    assert ts_skewed == 1
    assert abs(ts_largest - SKEW_S) < TOLERANCE_S
    assert ns_skewed == 1
    assert abs(ts_offset) < TOLERANCE_S
    # the tickles to both ran out unanswered; the one with the skewed clock is still shown so
    assert declared >= 2
    async with fleet.client() as ns:
        after = {c.name: c.tickle_state for c in await ns.computers()}
    assert after["ahead"] == "clock_skewed"
    assert after["walled"] == "unreachable"

    record(
        "Agent clock 60 s ahead",
        "one agent's clock shifted +60 s (test-only clock offset), one agent firewalled, one "
        "normal; a run-now on all three",
        f"ahead shown clock_skewed with offset {ahead:+.1f}s (firewalled one: unreachable); "
        f"its started/finished corrected by {steps['started'].clock_offset_s:+.1f}s to before "
        "recorded; task server counts 1 skewed agent, NS 1 skewed computer; the agent logged "
        "its clock is off",
        sent=3,
        recorded=len(run.executions),
        measured_offset_s=round(ahead, 3),
        tickle_flights_run_out=int(declared),
    )


def _steps(execution: ExecutionOut) -> dict[str, TimelineStep]:
    return {s.step: s for s in execution.timeline}
