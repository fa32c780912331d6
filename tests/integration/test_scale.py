"""Fleet scale: 2,000 simulated agents over 2 task servers, one run-now on all, every execution
recorded exactly once (correctness at scale; `make bench` measures the times)."""

from __future__ import annotations

import contextlib
import socket
import sqlite3

import pytest

from tests.integration.conftest import NET_BASE, Factory, eventually, metric
from tickle.messages import FINAL_STATUSES, RunCreate, TaskCreate
from tickle.testing.localfleet import AGENT_TICKLE_PORT
from tickle.testing.simagents import SimAgents, sim_host

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

AGENTS = 2000
# the simulated agents' addresses: a /16 of their own, apart from every session's fleets
SIM_NET = f"127.{NET_BASE + 64}"


async def test_a_run_now_on_2000_agents_is_recorded_exactly_once_per_execution(
    fleet_factory: Factory,
) -> None:
    fleet = await fleet_factory(["ts1", "ts2"], [])
    sims = SimAgents(fleet, AGENTS, SIM_NET)
    try:
        await sims.start(deadline_s=120)
        async with fleet.client() as ns:
            task = await ns.add_task(TaskCreate(name="scale", command=["true"]))
            run = await ns.run_now(RunCreate(task_id=task.id, computers=sims.names))
            assert len(run.executions) == AGENTS

            async def finished() -> bool:
                done = await metric(fleet.ns_url, "tickle_executions_total")
                return done >= AGENTS

            await eventually(finished, 120, "every finished event at the NS", every_s=0.5)
            run = await ns.run(run.id)
    finally:
        await sims.stop()
    assert all(e.status == "succeeded" for e in run.executions), {e.status for e in run.executions}
    assert all(e.status in FINAL_STATUSES for e in run.executions)
    assert len({e.computer for e in run.executions}) == AGENTS

    # once: one row per execution and kind in the NS database, whatever was retried or resent
    db_path = fleet.root / "ns" / "ns.db"

    async def every_hop_recorded() -> dict[str, int] | None:
        with contextlib.closing(sqlite3.connect(db_path)) as db:
            counts = dict(db.execute("SELECT kind, count(*) FROM status_events GROUP BY kind"))
        hops = ("agent_tickled", "agent_pulled", "started", "finished")
        return counts if all(counts.get(k, 0) >= AGENTS for k in hops) else None

    counts = await eventually(every_hop_recorded, 30, "every hop's events at the NS")
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        twice = db.execute(
            "SELECT execution_id, kind, count(*) FROM status_events"
            " GROUP BY execution_id, kind HAVING count(*) > 1 LIMIT 5"
        ).fetchall()
    assert twice == []
    assert all(counts[k] == AGENTS for k in counts), counts


async def test_a_fan_out_to_more_agents_than_connections_refuses_none(
    fleet_factory: Factory,
) -> None:
    # a task server whose agent API takes 64 connections at once (48 crowd it), 200 agents
    # tickled at once: each keeps its connection after its events (keep-alive), so without room
    # made the last pulls met a full table and were refused (503), or had their connections
    # closed for others, and waited out a backoff
    agents = 200
    fleet = await fleet_factory(["ts1"], [], ts_extra=["--max-connections", "64"])
    sims = SimAgents(fleet, agents, f"127.{NET_BASE + 65}")
    try:
        await sims.start(deadline_s=60)
        async with fleet.client() as ns:
            task = await ns.add_task(TaskCreate(name="crowd", command=["true"]))
            run = await ns.run_now(RunCreate(task_id=task.id, computers=sims.names))

            async def finished() -> bool:
                return await metric(fleet.ns_url, "tickle_executions_total") >= agents

            await eventually(finished, 60, "every finished event at the NS", every_s=0.5)
            run = await ns.run(run.id)
        ts_url = fleet.ts_url("ts1")
        refused = await metric(ts_url, "tickle_http_refused_total", reason="over_capacity")
        resent = await metric(ts_url, "tickle_tickles_resent_total")
    finally:
        await sims.stop()
    assert [e.status for e in run.executions] == ["succeeded"] * agents
    assert refused == 0
    assert resent == 0  # no agent's pull waited so long that its tickle went again


async def test_simulated_agents_that_cannot_listen_say_why(fleet_factory: Factory) -> None:
    # an agent's tickle address in use: the bench said only "failed to start: ''" (the reason, a
    # traceback, went to the terminal)
    net = f"127.{NET_BASE + 66}"
    fleet = await fleet_factory(["ts1"], [])
    sims = SimAgents(fleet, 2, net)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((sim_host(net, 1), AGENT_TICKLE_PORT))
        try:
            with pytest.raises(RuntimeError) as failed:
                await sims.start(deadline_s=60)
        finally:
            await sims.stop()
    message = str(failed.value)
    assert f"{sim_host(net, 1)}:{AGENT_TICKLE_PORT}" in message, message
    assert "in use" in message, message
    assert "\n" not in message, message
