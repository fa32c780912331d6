"""A task server down: its agents fail over to the next task server of their list, keep working."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from tests.reliability import record
from tickle.localfleet import AgentSpec, LocalFleet

from .conftest import (
    AGENT_KINDS,
    Planned,
    Stopwatch,
    all_final,
    create_runs,
    eventually,
    marker_counts,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(180)]
Factory = Callable[..., Awaitable[LocalFleet]]

FAILOVER_AFTER_S = 3.0
FAILOVER = ["--failover-after-s", str(FAILOVER_AFTER_S), "--failover-check-interval-s", "1"]


async def test_task_server_killed_agent_fails_over_to_the_next_and_gets_its_runs(
    fleet_factory: Factory, plan: Planned
) -> None:
    fleet = await fleet_factory(
        ["ts1", "ts2"],
        [AgentSpec("a1", ["ts1", "ts2"], extra=FAILOVER), AgentSpec("b1", ["ts2"])],
    )
    await create_runs(fleet, plan, ["a1"], per_computer=1, prefix="before-")
    await all_final(fleet, plan.ids, 30, "a run via ts1")
    assert await _task_server_of(fleet, "a1") == "ts1"

    fleet.kill("ts1")
    clock = Stopwatch()
    # created while a1 still belongs to the dead ts1: it must arrive through ts2 after failover
    during = Planned(plan.marker)
    await create_runs(fleet, during, ["a1"], per_computer=1, prefix="during-")
    await eventually(lambda: _on(fleet, "a1", "ts2"), 60, "a1 to fail over to ts2")
    failover_s = clock()
    a_during = await all_final(fleet, during.ids, 60, "the run created during the outage")
    during_s = clock()

    after = Planned(plan.marker)
    await create_runs(fleet, after, ["a1", "b1"], per_computer=1, prefix="after-")
    a_after = await all_final(fleet, after.ids, 30, "a run after the failover")
    a_id = after.executions["after-0-a1"][1]
    statuses = {**a_during.status, **a_after.status}
    duplicated = a_during.duplicated(AGENT_KINDS) + a_after.duplicated(AGENT_KINDS)
    record(
        case="task server down: agent failover",
        done=f"SIGKILL ts1; agent on [ts1, ts2] with failover_after_s={FAILOVER_AFTER_S:.0f}"
        " (check every 1 s); one run-now during the outage, one after",
        outcome="pass" if set(statuses.values()) == {"succeeded"} else "fail",
        sent=len(statuses),
        recorded=a_during.recorded() + a_after.recorded(),
        duplicated=duplicated,
        tried=1,
        time_to_fail_over_s=failover_s,
        run_during_outage_recorded_s=during_s,
        run_after_failover_s=round(a_after.latency[a_id], 3),
        run_after_failover_via=str(a_after.via[a_id]),
    )
    assert set(a_during.status.values()) == {"succeeded"}
    assert set(a_after.status.values()) == {"succeeded"}
    assert a_after.via[a_id] == "tickle", "after failover the new task server tickles the agent"
    assert FAILOVER_AFTER_S <= failover_s < FAILOVER_AFTER_S + 15, failover_s
    assert duplicated == 0
    assert max(marker_counts(plan).values()) == 1


async def _task_server_of(fleet: LocalFleet, name: str) -> str | None:
    async with fleet.client() as ns:
        return {c.name: c.task_server for c in await ns.computers()}[name]


async def _on(fleet: LocalFleet, name: str, ts: str) -> bool:
    return await _task_server_of(fleet, name) == ts
