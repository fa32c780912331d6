"""A task server down: its agents fail over to the next task server of their list, keep working."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path

import pytest

from tests.integration.conftest import Factory, agent_ctl
from tests.reliability import record
from tickle.testing.localfleet import AgentSpec, LocalFleet

from .conftest import (
    AGENT_KINDS,
    Planned,
    Stopwatch,
    all_final,
    audit,
    create_runs,
    eventually,
    marker_counts,
    metric,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(180)]

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


async def test_task_server_killed_holding_events_delivers_them_after_the_agent_moved(
    fleet_factory: Factory, plan: Planned, tmp_path: Path
) -> None:
    # blocked: tickles never reach the agent, so it runs the task only when told (check-now)
    fleet = await fleet_factory(
        ["ts1", "ts2"], [AgentSpec("a1", ["ts1", "ts2"], blocked=True, extra=FAILOVER)]
    )
    assert await _task_server_of(fleet, "a1") == "ts1"
    await create_runs(fleet, plan, ["a1"], per_computer=1, prefix="stranded-")
    (ex_id,) = plan.ids
    await eventually(lambda: _ts_pulled(fleet, ex_id), 30, "ts1 to pull the execution")

    # The NS is killed, not stopped: a stopped NS's listening socket still takes ts1's forward
    # into the kernel's buffers, and the NS records it when it resumes (then nothing is stranded).
    fleet.kill("ns")  # from here ts1 can only cache what it gets
    try:
        check = await asyncio.to_thread(agent_ctl, fleet, "a1", "check-now")
        assert check.returncode == 0, check.stderr
        ts1_url = fleet.ts_url("ts1")
        await eventually(
            lambda: _at_least(metric(ts1_url, "tickle_status_events_total", kind="finished"), 1),
            30,
            "ts1 to cache the finished event",
        )
        await eventually(lambda: _agent_outbox_empty(fleet), 30, "a1 to hand its events to ts1")
        fleet.kill("ts1")  # holding the events: the NS never saw them
    finally:
        fleet.spawn("ns")
    await fleet.wait_healthy(fleet.ns_url, "ns", 30)
    stranded = _outbox_events(fleet.root / "ts1", tmp_path / "ts1-outbox")
    assert {"started", "finished"} <= set(stranded.values()), stranded

    clock = Stopwatch()
    await eventually(lambda: _on(fleet, "a1", "ts2"), 60, "a1 to fail over to ts2")
    failover_s = clock()
    before_restart = await asyncio.to_thread(audit, fleet, plan.ids)
    assert before_restart.status[ex_id] not in ("succeeded", "failed"), "not stranded"

    fleet.spawn("ts1")  # it comes back on its state dir: its outbox forwards the old events
    clock = Stopwatch()
    a = await all_final(fleet, plan.ids, 60, "the stranded events recorded")
    recorded_s = clock()
    recorded_ids = await asyncio.to_thread(_recorded_event_ids, fleet, ex_id)
    times_recorded = {eid: recorded_ids[eid] for eid in stranded}
    refusals = fleet.log_tail("ts1", 400).count("refused status event")
    record(
        case="task server killed holding a moved agent's events",
        done="NS SIGKILLed, agent on [ts1, ts2] finishes a task through ts1, ts1 SIGKILLed"
        " holding its events, NS restarted, agent fails over to ts2, ts1 restarted on its state dir",
        outcome="pass"
        if a.status[ex_id] == "succeeded" and set(times_recorded.values()) == {1}
        else "fail",
        sent=len(stranded),
        recorded=sum(1 for n in times_recorded.values() if n >= 1),
        duplicated=sum(n - 1 for n in recorded_ids.values() if n > 1) + a.duplicated(AGENT_KINDS),
        tried=1,
        time_to_fail_over_s=failover_s,
        stranded_recorded_after_restart_s=recorded_s,
        stranded_kinds=",".join(sorted(stranded.values())),
    )
    assert a.status[ex_id] == "succeeded"
    assert times_recorded == dict.fromkeys(stranded, 1), times_recorded
    assert max(recorded_ids.values()) == 1
    assert a.duplicated(AGENT_KINDS) == 0
    assert refusals == 0
    assert marker_counts(plan) == {"stranded-0-a1": 1}


async def _ts_pulled(fleet: LocalFleet, ex_id: int) -> bool:
    async with fleet.client() as ns:
        execution = await ns.execution(ex_id)
    return any(t.step == "ts_pulled" and t.at is not None for t in execution.timeline)


async def _at_least(value: Awaitable[float], n: float) -> bool:
    return await value >= n


async def _agent_outbox_empty(fleet: LocalFleet) -> bool:
    status = await asyncio.to_thread(agent_ctl, fleet, "a1", "status")
    return status.returncode == 0 and json.loads(status.stdout)["outbox_depth"] == 0


def _outbox_events(state_dir: Path, copy_dir: Path) -> dict[str, str]:
    """The events a killed task server's outbox holds: event id -> kind (read from a copy)."""
    copy_dir.mkdir()
    for f in state_dir.glob("outbox.db*"):
        shutil.copy(f, copy_dir / f.name)
    db = sqlite3.connect(copy_dir / "outbox.db")
    try:
        rows = db.execute("SELECT event_id, body FROM outbox").fetchall()
    finally:
        db.close()
    return {str(eid): str(json.loads(body)["kind"]) for eid, body in rows}


def _recorded_event_ids(fleet: LocalFleet, ex_id: int) -> Counter[str]:
    """How many times each event id of the execution is in the NS database (read-only)."""
    db = sqlite3.connect(f"file:{fleet.root / 'ns' / 'ns.db'}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute(
            "SELECT event_id FROM status_events WHERE execution_id = ?", (ex_id,)
        ).fetchall()
    finally:
        db.close()
    return Counter(str(r[0]) for r in rows)


async def _task_server_of(fleet: LocalFleet, name: str) -> str | None:
    async with fleet.client() as ns:
        return {c.name: c.task_server for c in await ns.computers()}[name]


async def _on(fleet: LocalFleet, name: str, ts: str) -> bool:
    return await _task_server_of(fleet, name) == ts
