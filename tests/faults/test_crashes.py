"""SIGKILL each tier in the middle of real work: nothing lost, nothing recorded or run twice."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import pytest

from tests.integration.conftest import Factory, agent_ctl
from tests.reliability import record
from tickle.testing.localfleet import AgentSpec

from .conftest import (
    AGENT_KINDS,
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

AGENTS = [f"a{i}" for i in range(8)]


def _eight_agents_on_two_task_servers() -> list[AgentSpec]:
    return [AgentSpec(name, ["ts1" if i % 2 == 0 else "ts2"]) for i, name in enumerate(AGENTS)]


def _check_once(plan: Planned, a: object) -> None:
    """Every planned execution succeeded, its events recorded once, its task ran once."""
    from .conftest import Audit

    assert isinstance(a, Audit)
    assert a.by_status() == {"succeeded": len(plan.ids)}, a.by_status()
    assert a.missing() == [], a.missing()[:10]
    assert a.duplicated() == 0, [k for k, n in a.events.items() if n > 1][:10]
    assert all(n <= 1 for (_, k), n in a.events.items() if k == "agent_tickled")
    ran = marker_counts(plan)
    assert set(ran) == set(plan.executions), set(plan.executions) ^ set(ran)
    assert max(ran.values()) == 1, [t for t, n in ran.items() if n > 1]


async def test_ns_sigkilled_mid_run_of_200_executions_loses_and_repeats_nothing(
    fleet_factory: Factory, plan: Planned
) -> None:
    fleet = await fleet_factory(["ts1", "ts2"], _eight_agents_on_two_task_servers())
    clock = Stopwatch()
    await create_runs(fleet, plan, AGENTS, per_computer=13, sleep_s=0.5, prefix="before")

    async def some_recorded() -> bool:
        a = await asyncio.to_thread(audit, fleet, plan.ids)
        return 10 <= a.recorded() < len(plan.ids)

    await eventually(some_recorded, 60, "some (not all) executions recorded")
    fleet.kill("ns")
    killed_at = clock()
    # the agents go on: their events pile up at the task servers while the NS is dead
    cached = await eventually(lambda: ts_outbox_depth(fleet), 30, "events cached at the TS")
    fleet.spawn("ns")
    await fleet.wait_healthy(fleet.ns_url, "ns", 30)
    await create_runs(fleet, plan, AGENTS, per_computer=12, sleep_s=0.5, prefix="after")
    assert len(plan.ids) == 200
    a = await all_final(fleet, plan.ids, 120, "all 200 executions final")
    record(
        case="NS SIGKILLed mid-run",
        done="8 agents on 2 TS, 200 executions; SIGKILL the NS after the first were recorded,"
        " restart it on the same state dir, 96 more run-nows",
        outcome="pass" if a.duplicated() == 0 and not a.missing() else "fail",
        sent=len(plan.ids),
        recorded=a.recorded(),
        duplicated=a.duplicated(),
        tried=1,
        events_cached_at_ts_while_down=cached,
        killed_at_s=killed_at,
        all_recorded_at_s=clock(),
        **a.latency_figures(),
    )
    _check_once(plan, a)


async def test_task_server_sigkilled_with_cached_events_loses_and_repeats_nothing(
    fleet_factory: Factory, plan: Planned
) -> None:
    fleet = await fleet_factory(["ts1", "ts2"], _eight_agents_on_two_task_servers())
    gate = plan.marker.with_suffix(".gate")
    await create_runs(fleet, plan, AGENTS, per_computer=25, gate=gate)

    async def all_running() -> bool:
        a = await asyncio.to_thread(audit, fleet, plan.ids)
        return a.by_status() == {"running": 200}

    await eventually(all_running, 60, "all 200 executions running")
    fleet.kill("ns")  # from here the task servers can only cache
    gate.touch()  # now the tasks finish

    async def all_finished_at_the_task_servers() -> bool:
        return await ts_metric_sum(fleet, "tickle_status_events_total", kind="finished") >= 200

    await eventually(all_finished_at_the_task_servers, 90, "200 finished events at the TSs")
    cached = await ts_outbox_depth(fleet)
    fleet.kill("ts1")
    fleet.kill("ts2")
    clock = Stopwatch()
    fleet.spawn("ns")
    await fleet.wait_healthy(fleet.ns_url, "ns", 30)
    for ts in ("ts1", "ts2"):
        fleet.spawn(ts)
    a = await all_final(fleet, plan.ids, 120, "all 200 executions final after the restarts")
    record(
        case="TS SIGKILLed holding cached events",
        done="8 agents on 2 TS, 200 executions; NS killed so events pile up in the TS outboxes,"
        " both TS SIGKILLed, then NS and TS restarted on their state dirs",
        outcome="pass" if a.duplicated() == 0 and not a.missing() else "fail",
        sent=len(plan.ids),
        recorded=a.recorded(),
        duplicated=a.duplicated(),
        tried=1,
        events_cached_at_kill=cached,
        drain_after_restart_s=clock(),
    )
    assert cached >= 200, "the task servers held fewer events than the finished executions"
    _check_once(plan, a)


async def test_agent_sigkilled_while_its_task_runs_reports_it_interrupted_and_never_reruns(
    fleet_factory: Factory, plan: Planned
) -> None:
    fleet = await fleet_factory(["ts1"], [AgentSpec("a1", ["ts1"])])
    pidfile = plan.marker.with_suffix(".pid")
    async with fleet.client() as ns:
        from tickle.messages import RunCreate, TaskCreate

        script = f"echo $$ > {pidfile}; echo once >> {plan.marker}; sleep 30"
        task = await ns.add_task(TaskCreate(name="long", command=["sh", "-c", script]))
        run = await ns.run_now(RunCreate(task_id=task.id, computers=["a1"]))
    execution_id = run.executions[0].id
    plan.executions["once"] = ("a1", execution_id)

    async def running() -> bool:
        a = await asyncio.to_thread(audit, fleet, plan.ids)
        return a.status.get(execution_id) == "running" and pidfile.exists()

    await eventually(running, 30, "the task running (started recorded)")
    fleet.kill("a1")
    # the task's own process group outlives the agent; a service manager would kill it too
    with contextlib.suppress(ProcessLookupError, ValueError):
        os.killpg(int(pidfile.read_text()), signal.SIGKILL)
    clock = Stopwatch()
    fleet.spawn("a1")
    a = await all_final(fleet, plan.ids, 30, "the execution reported after the restart")
    reported_after = clock()
    # another pull must not bring it back: it is final at the NS and claimed at the agent
    check = agent_ctl(fleet, "a1", "check-now")
    assert check.returncode == 0, check.stderr
    a = audit(fleet, plan.ids)
    record(
        case="agent SIGKILLed while its task runs",
        done="SIGKILL the agent (and its task) mid-task, restart it on its state dir",
        outcome="pass" if a.status[execution_id] == "interrupted" else "fail",
        sent=1,
        recorded=a.recorded(),
        duplicated=a.duplicated(AGENT_KINDS),
        tried=1,
        status=a.status[execution_id],
        reported_after_restart_s=reported_after,
        times_run=marker_counts(plan)["once"],
    )
    assert a.status[execution_id] == "interrupted"
    assert a.duplicated(AGENT_KINDS) == 0
    assert a.missing(AGENT_KINDS) == []
    assert marker_counts(plan) == {"once": 1}
