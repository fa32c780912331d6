"""The NS unreachable for 60 s while executions run: task servers cache, then drain; none lost."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from tests.integration.conftest import Factory
from tests.reliability import record
from tickle.testing.localfleet import AgentSpec, LocalFleet

from .conftest import (
    Planned,
    Stopwatch,
    all_final,
    audit,
    create_runs,
    eventually,
    marker_counts,
    ts_metric_sum,
    ts_outbox_depth,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(240)]

OUTAGE_S = 60.0
AGENTS = ["a1", "a2", "a3", "a4"]


async def test_ns_stopped_60s_task_servers_cache_then_drain_nothing_lost_or_doubled(
    fleet_factory: Factory, plan: Planned
) -> None:
    fleet = await fleet_factory(
        ["ts1", "ts2"], [AgentSpec(a, ["ts1" if i < 2 else "ts2"]) for i, a in enumerate(AGENTS)]
    )
    # executions that start now, wait for the outage, then finish one after another during it
    gate = fleet.root / "outage-began"
    await create_runs(
        fleet, plan, AGENTS, per_computer=12, sleep_s=[1 + 3.5 * i for i in range(12)],
        gate=gate, gate_first=True,
    )  # fmt: skip

    async def all_started() -> bool:
        a = await asyncio.to_thread(audit, fleet, plan.ids)
        return len(a.status) == len(plan.ids) and "pending" not in a.by_status()

    await eventually(all_started, 60, "every execution started")
    finished_before = await ts_metric_sum(fleet, "tickle_status_events_total", kind="finished")
    fleet.signal("ns", signal.SIGSTOP)
    stopped = time.monotonic()
    gate.touch()
    peak, samples = 0, 0
    try:
        while time.monotonic() - stopped < OUTAGE_S:  # bounded: one sample per 0.5 s
            peak = max(peak, await ts_outbox_depth(fleet))
            samples += 1
            await asyncio.sleep(0.5)
        finished_during = (
            await ts_metric_sum(fleet, "tickle_status_events_total", kind="finished")
            - finished_before
        )
    finally:
        fleet.signal("ns", signal.SIGCONT)
    clock = Stopwatch()
    a = await all_final(fleet, plan.ids, 120, "every execution recorded after the outage")
    await eventually(lambda: _empty(fleet), 60, "the task server outboxes drained")
    drain_s = clock()
    a = audit(fleet, plan.ids)
    record(
        case="NS unreachable for 60 s",
        done=f"SIGSTOP the NS for {OUTAGE_S:.0f} s while {len(plan.ids)} executions on 4 agents"
        " / 2 TS finish one after another during it, then SIGCONT",
        outcome="pass" if a.duplicated() == 0 and not a.missing() else "fail",
        sent=len(plan.ids),
        recorded=a.recorded(),
        duplicated=a.duplicated(),
        tried=1,
        outage_s=OUTAGE_S,
        finished_accepted_by_ts_during_outage=finished_during,
        outbox_depth_peak=peak,
        drain_s=drain_s,
    )
    assert finished_during == len(plan.ids), "the task servers did not keep accepting events"
    assert peak >= finished_during, (peak, finished_during)
    assert a.by_status() == {"succeeded": len(plan.ids)}, a.by_status()
    assert a.missing() == []
    assert a.duplicated() == 0
    assert max(marker_counts(plan).values()) == 1


async def _empty(fleet: LocalFleet) -> bool:
    return await ts_outbox_depth(fleet) == 0
